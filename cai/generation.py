"""Batched chat generation and option scoring on one model.

Why our own decode loop instead of `model.generate`: rows that finished (EOS) are dropped from the
batch and the KV cache, so a batch costs what its live rows cost, not what its longest row costs;
and prompts are bucketed by length so left padding stays small. Sampling is seeded per batch, so a
redone shard (same rows, same order) gives the same text.

Shapes: B batch, T prompt tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.chat import generation_prompt_ids
from cai.config import GenerationConfig


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool  # ended with EOS rather than the token limit
    ids: tuple[int, ...] = ()  # the sampled tokens, EOS included when finished


NUCLEUS_CANDIDATES = 256  # tokens ranked per row before a full sort is needed (README: Performance)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, K) unnormalised probabilities, (B, 1) uniforms -> (B, 1) column indices."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)


def _nucleus(ranked: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities sorted descending -> the smallest prefix whose mass reaches top_p kept, the rest zeroed (the
    first token always stays)."""
    return ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy.

    Inverse-CDF sampling (one uniform per row, then a binary search in the cumulative
    distribution): torch.multinomial on CPU draws V exponentials per row (README: Performance).
    The nucleus is found among each row's NUCLEUS_CANDIDATES most likely tokens (a top-k, far cheaper than
    sorting the vocabulary at every step); only rows whose nucleus is wider are sorted in full. Either way the
    token drawn is the one a full sort gives.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)          # (B, V)
    u = torch.rand(len(probs), 1, generator=gen, dtype=probs.dtype, device=probs.device)
    if top_p >= 1.0:
        return _inverse_cdf(probs, u).squeeze(-1)
    ranked, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)   # (B, K), descending
    choice = order.gather(-1, _inverse_cdf(_nucleus(ranked, top_p), u))              # (B, 1)
    wide = (ranked.cumsum(-1)[:, -1] < top_p).nonzero().squeeze(-1)  # rows whose nucleus reaches past K
    if len(wide):
        ranked, order = probs[wide].sort(dim=-1, descending=True)
        choice[wide] = order.gather(-1, _inverse_cdf(_nucleus(ranked, top_p), u[wide]))
    return choice.squeeze(-1)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids and mask, padded on the left so every row ends at column T-1."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def shared_prefix_len(rows: list[list[int]], minimum: int) -> int:
    """Tokens every row starts with, leaving each row at least one own token; 0 if under `minimum`."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n if n >= minimum else 0


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only `rows` of a StaticCache (transformers has no batch_select for static layers)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = len(rows)


def end_ids(model, tokenizer) -> frozenset[int]:
    """Every token id that ends a response: those the model's generation config, its config and its
    tokenizer declare as end of sequence, and the chat template's end-of-turn token."""
    found: set[int] = set()
    for declared in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id,
                     tokenizer.eos_token_id):
        found.update(declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else [])
    if "<|im_end|>" in tokenizer.get_vocab():
        found.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return frozenset(found)


class ChatGenerator:
    """Wraps one causal LM (already on `device`) and its tokenizer; all methods are batched."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, device: torch.device | str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.device = torch.device(device)
        self.end_ids = end_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.min_shared_prefix = 32  # shorter shared prefixes are not worth a separate forward

    # -- prompts -------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict], max_tokens: int, continue_text: str = "") -> list[int]:
        """Chat messages -> prompt ids ending at the assistant's turn (cut from the left if long)."""
        return generation_prompt_ids(self.tokenizer, messages, self.system_prompt, max_tokens, continue_text)

    # -- sampling ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], cfg: GenerationConfig, seed: int) -> list[Completion]:
        """Generate for token-id prompts; output order matches input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # length buckets
        out: list[Completion | None] = [None] * len(prompts)
        for b, start in enumerate(range(0, len(order), cfg.batch_size)):
            idx = order[start:start + cfg.batch_size]
            gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + b)
            for i, c in zip(idx, self._generate_batch([prompts[i] for i in idx], cfg, gen)):
                out[i] = c
        return out  # type: ignore[return-value]

    def _prefill(self, rows: list[list[int]], extra: int):
        """One forward over the prompts, laid out per row as [shared prefix P][left padding][own suffix S]: the
        prefix (the system turn, few-shot conversations, a judge's worked examples) runs once and is copied to
        every row, and so does a prompt that occurs several times. -> (cache with room for `extra` more tokens, mask (B, T + extra), positions (B, S), last
        logits (B, V), T)."""
        from transformers import StaticCache

        unique = list(dict.fromkeys(map(tuple, rows)))
        if len(unique) < len(rows):  # the same prompt several times (samples per prompt, a shared few-shot draw)
            cache, mask, positions, logits, T = self._prefill([list(u) for u in unique], extra)
            where = {u: i for i, u in enumerate(unique)}
            copies = torch.tensor([where[tuple(r)] for r in rows], device=self.device)
            _select_rows(cache, copies)
            return cache, mask[copies], positions[copies], logits[copies], T
        P = shared_prefix_len(rows, self.min_shared_prefix)
        dev = self.device
        ids, suffix_mask = left_pad([r[P:] for r in rows], self.pad_id, dev)   # (B, S)
        B, S = ids.shape
        T = P + S
        # A preallocated cache: appending to a growing one re-copies it every step.
        cache = StaticCache(config=self.model.config, max_cache_len=T + extra)
        mask = torch.zeros(B, T + extra, dtype=torch.long, device=dev)
        mask[:, :P] = 1
        mask[:, P:T] = suffix_mask
        if P:
            self.model(input_ids=torch.tensor([rows[0][:P]], device=dev), attention_mask=mask[:1],
                       past_key_values=cache, cache_position=torch.arange(P, device=dev), use_cache=True,
                       logits_to_keep=1)
            _select_rows(cache, torch.zeros(B, dtype=torch.long, device=dev))
        positions = P + (suffix_mask.cumsum(-1) - 1).clamp(min=0)                 # (B, S)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            cache_position=torch.arange(P, T, device=dev), use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        return cache, mask, positions, logits, T

    def _generate_batch(self, rows: list[list[int]], cfg: GenerationConfig, gen: torch.Generator):
        dev = self.device
        cache, mask, positions, logits, T = self._prefill(rows, cfg.max_new_tokens)
        B = len(rows)
        live = torch.arange(B, device=dev)                            # rows still generating
        tokens: list[list[int]] = [[] for _ in rows]
        ended: list[int | None] = [None] * B                          # the end id that finished each row
        next_pos = positions[:, -1] + 1
        for step in range(cfg.max_new_tokens):
            nxt = sample_next(logits, cfg.temperature, cfg.top_p, gen)  # (B_live,)
            keep = []
            for j, (row, tok) in enumerate(zip(live.tolist(), nxt.tolist())):
                if tok in self.end_ids:
                    ended[row] = tok
                else:
                    tokens[row].append(tok)
                    keep.append(j)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(live):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=dev)
                _select_rows(cache, sel)
                live, nxt, mask, next_pos = live[sel], nxt[sel], mask[sel], next_pos[sel]
            mask[:, T + step] = 1
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                past_key_values=cache, cache_position=torch.tensor([T + step], device=dev),
                                use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return [Completion(self.tokenizer.decode(t, skip_special_tokens=True).strip(), len(r), len(t) + (end is not None),
                           end is not None, tuple(t) + ((end,) if end is not None else ()))
                for r, t, end in zip(rows, tokens, ended)]

    def generate_chat(self, conversations: list[list[dict]], cfg: GenerationConfig, seed: int,
                      continue_text: str = "") -> list[Completion]:
        prompts = [self.chat_ids(m, cfg.max_prompt_tokens, continue_text) for m in conversations]
        return self.generate_ids(prompts, cfg, seed)

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def option_logprobs(self, prompts: list[list[int]], options: list[list[int]], batch_size: int) -> torch.Tensor:
        """Next-token log-probs of each option's first token after each prompt: (N, n_options).

        Prompts are batched by length, their shared prefix (few-shot examples) runs once per batch, and only
        the last position's logits are computed (`logits_to_keep=1`): the lm_head over the whole sequence is the
        largest single cost of a scoring pass on a small model.
        """
        option_ids = torch.tensor([o[0] for o in options], device=self.device)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        result = torch.empty(len(prompts), len(options))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            logits = self._prefill([prompts[i] for i in idx], 0)[3].float()        # (B, V)
            result[idx] = torch.log_softmax(logits, -1)[:, option_ids].cpu()
        return result
