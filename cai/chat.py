"""Chat messages and their token ids: one way to build a conversation (with the policy's system prompt, when
set) and to tokenise it, shared by generation, the SFT data, the reward model and PPO's scoring."""
from __future__ import annotations


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` after the system turn `system_prompt` (None: the chat template's own default)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def conversation(prompt: str, system_prompt: str | None) -> list[dict]:
    """A single-turn request as the policy sees it."""
    return with_system([user(prompt)], system_prompt)


def generation_prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None, max_tokens: int,
                          continue_text: str = "") -> list[int]:
    """Ids that end at the assistant's turn (plus `continue_text`, which the model then continues), cut from
    the left to `max_tokens`. The template's own text carries its BOS where it has one."""
    text = tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text + continue_text, add_special_tokens=False)["input_ids"][-max_tokens:]


def chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool = False, open_last: bool = False) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template. `open_last` leaves the last turn without its
    end-of-turn token: a response cut at the token limit is not a finished answer."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt,
                                        continue_final_message=open_last)
    return list(out["input_ids"])


def prompt_completion_ids(tokenizer, prompt: list[dict], completion: list[dict], finished: bool = True
                          ) -> tuple[list[int], int]:
    """-> (ids of prompt + completion, number of leading prompt ids). The completion starts where the prompt
    alone and the whole conversation stop agreeing (a template may render the two slightly differently)."""
    head = chat_ids(tokenizer, prompt, generation_prompt=True)
    ids = chat_ids(tokenizer, prompt + completion, open_last=not finished)
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return ids, n


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for models that have one, else nothing)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    marked = tokenizer("x", add_special_tokens=True)["input_ids"]
    k = len(marked) - len(plain)
    return list(marked[:k]) if k > 0 and marked[k:k + len(plain)] == plain else []
