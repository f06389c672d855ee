"""Chat rendering shared by every stage: the system prompt, unfinished turns, BOS, end ids."""
from __future__ import annotations

import math

import torch

from cai.chat import assistant, chat_ids, conversation, prompt_completion_ids, special_prefix, user
from cai.config import GenerationConfig
from cai.constitution import load_constitution
from cai.feedback import label_pairs
from cai.generation import ChatGenerator, end_ids

from .conftest import REPO


def test_system_prompt_is_the_first_turn_everywhere(tiny_generator):
    tok = tiny_generator.tokenizer
    assert conversation("Hi?", None) == [user("Hi?")]
    assert conversation("Hi?", "Be brief.") == [{"role": "system", "content": "Be brief."}, user("Hi?")]
    text = tok.decode(chat_ids(tok, conversation("Hi?", "Be brief.")))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in text
    gen = ChatGenerator(tiny_generator.model, tok, system_prompt="Be brief.")
    assert tok.decode(gen.chat_ids([user("Hi?")], 4096)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_an_unfinished_completion_has_no_end_of_turn(tiny_generator):
    tok = tiny_generator.tokenizer
    prompt, completion = conversation("Hi?", None), [assistant("Hello there")]
    done, n_done = prompt_completion_ids(tok, prompt, completion, finished=True)
    cut, n_cut = prompt_completion_ids(tok, prompt, completion, finished=False)
    assert n_done == n_cut == len(chat_ids(tok, prompt, generation_prompt=True))
    assert tok.decode(done[n_done:]).startswith("Hello there<|im_end|>")
    assert tok.decode(cut[n_cut:]) == "Hello there"
    assert done[:len(cut)] == cut


def bos_tokenizer(tok):
    """The tiny model's tokenizer, made to put <|im_start|> (id 1) before every text, as Llama's puts BOS."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tok)
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    return tok


def test_the_feedback_prompt_keeps_the_tokenizers_bos(tiny_generator):
    seen = []

    class Judge:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def option_logprobs(self, prompts, options, batch_size):
            seen.extend(prompts)
            return torch.tensor([[math.log(0.6), math.log(0.4)]] * len(prompts))

    pair = [{"id": "p", "prompt": "q", "r1": "a", "r2": "b", "aspect": "harmless"}]
    args = dict(seed=0, both_orders=True, n_shots=0, cot=False, cot_generation=None, cot_clamp=(0, 1),
                max_tokens=4096, batch_size=4)
    constitution = load_constitution(REPO / "constitutions/default.yaml")
    plain = tiny_generator.tokenizer
    assert special_prefix(plain) == [] and special_prefix(bos_tokenizer(plain)) == [1]
    label_pairs(Judge(bos_tokenizer(plain)), pair, constitution, **args)
    assert len(seen) == 2 and all(ids[0] == 1 and ids[1] != 1 for ids in seen)
    seen.clear()
    label_pairs(Judge(plain), pair, constitution, **args)
    assert all(ids[0] != 1 for ids in seen)


def test_generation_stops_on_every_declared_end_id(tiny_generator):
    """A model that declares two end ids: a row stops at whichever it samples first."""
    g = tiny_generator
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)
    prompt = g.chat_ids([user("Tell me a story about a cat.")], 4096)
    free = g.generate_ids([prompt], cfg, seed=0)[0]
    assert not free.finished and len(free.ids) == 12
    extra = free.ids[4]  # a token greedy decoding reaches at step 5: declare it an end id too
    model = g.model
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [before, extra]
    try:
        assert end_ids(model, g.tokenizer) >= {2, extra}
        stopped = ChatGenerator(model, g.tokenizer).generate_ids([prompt], cfg, seed=0)[0]
    finally:
        model.generation_config.eos_token_id = before
    k = free.ids.index(extra)
    assert stopped.finished and stopped.ids == free.ids[:k + 1] and stopped.new_tokens == k + 1
