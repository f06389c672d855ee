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
from cai.kv_cache import PrefixKV, RowCache, RowStore, StoredRow, prefix_attention_on


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool  # ended with EOS rather than the token limit
    ids: tuple[int, ...] = ()  # the sampled tokens, EOS included when finished


NUCLEUS_DRAWS = 8  # draws tried per row before its nucleus is found by a full sort (README: Performance)


CDF_BLOCK = 256  # the inverse CDF finds a block of this many tokens, then the token within it


def _last_positive(cum: torch.Tensor) -> torch.Tensor:
    """(B, K) cumulative sums -> (B, 1) the last column that adds mass: what a draw rounded past the end gets."""
    return (cum < cum[:, -1:]).sum(-1, keepdim=True)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V) unnormalised probabilities, (B, 1) uniforms in [0, 1) -> (B, 1) column indices.

    In two levels for a wide vocabulary: a cumulative sum over the whole vocabulary is a serial scan, as slow
    as the rest of a sampling step together, while block sums and a scan of one block are not."""
    B, V = probs.shape
    if V <= 4 * CDF_BLOCK:
        cdf = probs.cumsum(-1)
        return torch.minimum(torch.searchsorted(cdf, u * cdf[:, -1:], right=True), _last_positive(cdf))
    padded = torch.nn.functional.pad(probs, (0, -V % CDF_BLOCK)) if V % CDF_BLOCK else probs
    blocks = padded.view(B, -1, CDF_BLOCK)                                                 # (B, V/256, 256)
    mass = blocks.sum(-1)
    cmass = mass.cumsum(-1)                                                                # (B, V/256)
    target = u * cmass[:, -1:]
    block = torch.minimum(torch.searchsorted(cmass, target, right=True), _last_positive(cmass))     # (B, 1)
    within = (target - (cmass.gather(-1, block) - mass.gather(-1, block))) / mass.gather(-1, block)
    cdf = blocks[torch.arange(B, device=probs.device), block.squeeze(-1)].cumsum(-1)          # (B, 256)
    col = torch.searchsorted(cdf, within.clamp(0, 1) * cdf[:, -1:], right=True)
    return block * CDF_BLOCK + torch.minimum(col, _last_positive(cdf))


def _nucleus_by_sort(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities -> (B, 1) token ids drawn from the smallest set of likeliest tokens whose mass reaches
    top_p (the likeliest token always in), by sorting the vocabulary."""
    ranked, order = probs.sort(-1, descending=True)
    return order.gather(-1, _inverse_cdf(ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0), u))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy.

    Inverse-CDF sampling (one uniform per row, then a binary search in the cumulative
    distribution): torch.multinomial on CPU draws V exponentials per row (README: Performance).
    Top-p by rejection, without sorting the vocabulary: a token drawn from the whole distribution is in the
    nucleus when the tokens likelier than it hold less than top_p of the mass, and a drawn token that is not is
    drawn again. Conditioning the full distribution on the nucleus is the nucleus distribution, so this samples
    exactly what sorting would (a token tied with the nucleus's last one counts as in). At least top_p of the
    mass is accepted per draw; rows still rejected after NUCLEUS_DRAWS draws are sorted.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits if temperature == 1 else logits / temperature, -1, dtype=torch.float32)  # (B, V)
    u = torch.rand(len(probs), 1, generator=gen, dtype=probs.dtype, device=probs.device)
    choice = _inverse_cdf(probs, u)                                      # (B, 1)
    if top_p >= 1.0:
        return choice.squeeze(-1)
    rows = torch.arange(len(probs), device=probs.device)                 # rows whose draw is not yet accepted
    for _ in range(NUCLEUS_DRAWS):
        # tokens likelier than the drawn one hold at most 1 - p(drawn): a draw above 1 - top_p is in, unchecked
        rows = rows[probs.gather(-1, choice).squeeze(-1)[rows] <= 1 - top_p]
        p = probs[rows]
        likelier = (p * (p > p.gather(-1, choice[rows]))).sum(-1)       # (n,) mass of tokens likelier than drawn
        rows = rows[likelier >= top_p]
        if not len(rows):
            return choice.squeeze(-1)
        u = torch.rand(len(rows), 1, generator=gen, dtype=probs.dtype, device=probs.device)
        choice[rows] = _inverse_cdf(probs[rows], u)
    choice[rows] = _nucleus_by_sort(probs[rows], top_p, u)
    return choice.squeeze(-1)


def window_groups(new: list[int], forward_tokens: int) -> list[tuple[int, int]]:
    """Rows sorted by how many tokens a prefill computes for them (ascending) -> row ranges [lo, hi), one forward
    each, every row computed over its range's widest window: the split with the fewest tokens computed, counting
    `forward_tokens` for each forward."""
    best, cut = [0] + [None] * len(new), [0] * (len(new) + 1)
    for j in range(1, len(new) + 1):
        best[j], cut[j] = min((best[i] + (j - i) * new[j - 1] + forward_tokens, i) for i in range(j))
    ranges, j = [], len(new)
    while j:
        ranges.append((cut[j], j))
        j = cut[j]
    return ranges[::-1]


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


@dataclass
class _Batch:
    """A batch being decoded: its caches and, per live row, where its own columns start and what comes next."""
    cache: RowCache
    prefix: PrefixKV | None
    valid: torch.Tensor      # (B, columns) bool: the columns each row attends to
    next_pos: torch.Tensor   # (B,) position id of each row's next token
    logits: torch.Tensor     # (B, V) next-token logits
    starts: list[int]        # per row given: the column its own tokens start at
    own: list[list[int]]     # per row given: its prompt tokens after the prefix
    prompt_end: int          # the column the first generated token goes to
    order: list[int]         # per batch row: the row given that it is

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)
        self._reorder(rows)

    def drop(self, dead: list[int]) -> list[int]:
        """Remove rows `dead` (RowCache.drop) -> the old index of the row now at each position."""
        order = self.cache.drop(dead)
        self._reorder(torch.tensor(order, device=self.valid.device))
        return order

    def _reorder(self, rows: torch.Tensor) -> None:
        self.valid, self.next_pos, self.logits = self.valid[rows], self.next_pos[rows], self.logits[rows]


class ChatGenerator:
    """Wraps one causal LM (already on `device`) and its tokenizer; all methods are batched.

    `reuse_kv`: keep prefixes' and generated rows' keys/values from one call to the next (cai/kv_cache.py), for
    weights that do not change between calls (a generation actor's); otherwise they live for one call."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, device: torch.device | str = "cpu",
                 reuse_kv: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.device = torch.device(device)
        self.end_ids = end_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.min_shared_prefix = 32  # shorter shared prefixes are not worth a separate forward
        self.forward_tokens = 64     # a forward's own cost, in prompt tokens: what splitting a prefill must save
        self.reuse_kv = reuse_kv
        self.min_reuse = 16          # a prompt sharing fewer tokens with every stored row is computed afresh
        self.max_prefixes = 8
        self._prefixes: dict[tuple[int, ...], PrefixKV] = {}
        self._rows = RowStore(max_bytes=256 * 2**20)
        self.reused_tokens = 0       # prompt tokens whose keys/values came from a stored row, not a forward
        self.computed_tokens = 0     # prompt tokens a forward computed, padding and shared prefixes included
        self.decode_steps = 0        # one-token-per-row forwards: the count a batch's longest row sets

    # -- prompts -------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict], max_tokens: int, continue_text: str = "") -> list[int]:
        """Chat messages -> prompt ids ending at the assistant's turn (cut from the left if long)."""
        return generation_prompt_ids(self.tokenizer, messages, self.system_prompt, max_tokens, continue_text)

    def forget(self) -> None:
        """Drop every kept prefix and row (after the weights changed)."""
        self._prefixes.clear()
        self._rows.clear()

    # -- sampling ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], cfg: GenerationConfig, seed: int) -> list[Completion]:
        """Generate for token-id prompts; output order matches input order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # length buckets
        out: list[Completion | None] = [None] * len(prompts)
        self._rows.new_call()
        try:
            for b, start in enumerate(range(0, len(order), cfg.batch_size)):
                idx = order[start:start + cfg.batch_size]
                gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + b)
                for i, c in zip(idx, self._generate_batch([prompts[i] for i in idx], cfg, gen)):
                    out[i] = c
        finally:
            if not self.reuse_kv:
                self.forget()
        return out  # type: ignore[return-value]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: RowCache,
                 prefix: PrefixKV | None) -> torch.Tensor:
        """(B, q) tokens at `positions`, attending where `mask` (B, 1, q, columns) says -> last logits (B, V)."""
        with prefix_attention_on(self.model):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True, logits_to_keep=1, prefix=prefix).logits[:, -1]

    def _prefix(self, rows: list[list[int]]) -> PrefixKV | None:
        """The prefix every row starts with, computed once (one row) and kept: a kept prefix that covers all but a
        few of the shared tokens is taken as it is."""
        P = shared_prefix_len(rows, self.min_shared_prefix)
        if not P:
            return None
        head = tuple(rows[0][:P])
        kept = [ids for ids in self._prefixes if P - self.min_shared_prefix < len(ids) <= P and head[:len(ids)] == ids]
        if kept:
            ids = max(kept, key=len)
            self._prefixes[ids] = self._prefixes.pop(ids)  # most recently used last
            return self._prefixes[ids]
        cache = RowCache(self.model.config.num_hidden_layers, P, 1)
        cache.reserve(P)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()[None, None]
        self.computed_tokens += P
        self._forward(torch.tensor([head], device=self.device), torch.arange(P, device=self.device)[None], causal,
                      cache, None)
        prefix = PrefixKV(head, [k[:, :, :P] for k in cache.keys], [v[:, :, :P] for v in cache.values])
        self._prefixes[head] = prefix
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.pop(next(iter(self._prefixes)))
        return prefix

    def _prefill(self, rows: list[list[int]], extra: int) -> _Batch:
        """Forwards over the prompts, laid out per row as [prefix P, kept once][left padding][own tokens S]. An own
        part that extends a stored row copies that row's keys/values in; a forward computes only the last W columns,
        W the longest part a row has not stored. Rows are ordered by that part and grouped (`window_groups`), so
        that one long part does not set W for all. The same prompt several times runs once."""
        unique = list(dict.fromkeys(map(tuple, rows)))
        if len(unique) < len(rows):  # the same prompt several times (samples per prompt, a shared few-shot draw)
            batch = self._prefill([list(u) for u in unique], extra)
            index = {u: k for k, u in enumerate(unique)}
            where = [index[tuple(r)] for r in rows]
            at = {u: b for b, u in enumerate(batch.order)}                 # batch position of each unique prompt
            batch.select(torch.tensor([at[u] for u in where], device=self.device))
            batch.starts, batch.own = [batch.starts[u] for u in where], [batch.own[u] for u in where]
            batch.order = list(range(len(rows)))
            return batch
        dev = self.device
        prefix = self._prefix(rows)
        P = len(prefix.ids) if prefix else 0
        own = [r[P:] for r in rows]
        found = [self._rows.best(prefix, o, self.min_reuse) for o in own]
        new = [len(o) - min(n, len(o) - 1) for (_, n), o in zip(found, own)]   # tokens no stored row holds
        S = max(map(len, own))
        starts = [S - len(o) for o in own]
        order = sorted(range(len(rows)), key=new.__getitem__)                   # batch row b is prompt order[b]
        cache = RowCache(self.model.config.num_hidden_layers, S + extra, len(rows))
        first = torch.tensor([starts[i] for i in order], device=dev)[:, None]         # (B, 1)
        cols = torch.arange(S + extra, device=dev)
        valid = (cols >= first) & (cols < S)                                           # (B, S + extra)
        C = cache.reserve(S)                                                           # >= S, those past S hidden
        logits = []
        for lo, hi in window_groups([new[i] for i in order], self.forward_tokens):
            W = new[order[hi - 1]]                                                     # columns this forward computes
            for b, i in enumerate(order[lo:hi], lo):
                if found[i][0] is not None and len(own[i]) > W:
                    cache.copy_in(b, starts[i], found[i][0].kv.first(len(own[i]) - W))
                    self.reused_tokens += len(own[i]) - W
            cache.rows, cache.write_at = slice(lo, hi), S - W
            ids, _ = left_pad([own[i][max(0, len(own[i]) - W):] for i in order[lo:hi]], self.pad_id, dev)  # (B_g, W)
            self.computed_tokens += ids.numel()
            q = cols[S - W:S]                                                          # the window's columns
            mask = ((cols[None, :C] <= q[:, None]) & valid[lo:hi, None, :C]) | (cols[None, :C] == q[:, None])
            logits.append(self._forward(ids, P + (q - first[lo:hi]).clamp(min=0), mask[:, None], cache, prefix))
        cache.rows, cache.write_at = slice(None), S
        next_pos = torch.tensor([P + len(own[i]) for i in order], device=dev)
        return _Batch(cache, prefix, valid, next_pos, torch.cat(logits), starts, own, S, order)

    def _step(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row (B,) -> next logits (B, V)."""
        c = batch.cache.write_at
        batch.valid[:, c] = True
        C = batch.cache.reserve(c + 1)
        logits = self._forward(tokens[:, None], batch.next_pos[:, None], batch.valid[:, None, None, :C],
                               batch.cache, batch.prefix)
        batch.cache.write_at += 1
        batch.next_pos = batch.next_pos + 1
        self.decode_steps += 1
        return logits

    def _keep_rows(self, batch: _Batch, live: list[int], js: list[int], tokens: list[list[int]]) -> None:
        """Store live rows js (their prompt and the tokens fed so far) for a later call's prompts to extend."""
        if not self.reuse_kv:
            return
        fed, end = batch.cache.write_at - batch.prompt_end, batch.cache.write_at
        kept = batch.cache.copy_rows(js, [batch.starts[live[j]] for j in js], end)
        for j, kv in zip(js, kept):
            ids = tuple(batch.own[live[j]]) + tuple(tokens[live[j]][:fed])
            self._rows.add(StoredRow(batch.prefix, ids, kv))

    def _generate_batch(self, rows: list[list[int]], cfg: GenerationConfig, gen: torch.Generator):
        batch = self._prefill(rows, cfg.max_new_tokens)
        B = len(rows)
        live = list(batch.order)                                      # per batch row: the row it is, still generating
        tokens: list[list[int]] = [[] for _ in rows]
        ended: list[int | None] = [None] * B                          # the end id that finished each row
        for step in range(cfg.max_new_tokens):
            nxt = sample_next(batch.logits, cfg.temperature, cfg.top_p, gen)  # (B_live,)
            keep = []
            for j, (row, tok) in enumerate(zip(live, nxt.tolist())):
                if tok in self.end_ids:
                    ended[row] = tok
                else:
                    tokens[row].append(tok)
                    keep.append(j)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(live):  # drop finished rows from the batch and the cache
                dead = sorted(set(range(len(live))) - set(keep))
                self._keep_rows(batch, live, dead, tokens)
                order = batch.drop(dead)
                live, nxt = [live[j] for j in order], nxt[torch.tensor(order, device=self.device)]
            batch.logits = self._step(batch, nxt)
        self._keep_rows(batch, live, list(range(len(live))), tokens)
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
            batch = self._prefill([prompts[i] for i in idx], 0)
            result[[idx[b] for b in batch.order]] = torch.log_softmax(batch.logits.float(), -1)[:, option_ids].cpu()
        if not self.reuse_kv:
            self.forget()
        return result
