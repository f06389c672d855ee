"""Key/value caches for ChatGenerator (cai/generation.py): work a later forward need not redo.

- `PrefixKV`: the keys/values of a prefix every row of a batch starts with (the system turn, few-shot
  conversations, a judge's worked examples), computed once as one row. Rows attend to it through
  `prefix_attention` without a copy per row: at each decoding step the prefix is read once for the whole batch.
- `RowCache`: each row's own tokens after the prefix, grown in chunks of columns; a forward writes at `write_at`
  and attends to the columns before it.
- `RowStore`: the keys/values of the rows an earlier call generated, so that a prompt extending one (the
  revision request after the critique it asks about) computes only what is new.

Every reuse is exact up to float rounding: the keys and values are those the full forward computes, and
attention takes one softmax over [prefix | row] as over the concatenated sequence.

Shapes: B rows, H key/value heads, G query heads per key/value head, P prefix tokens, L row columns, q query
tokens, D head dim.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

ATTENTION = "cai_prefix_sdpa"  # our name in transformers' attention registry


@dataclass(frozen=True, eq=False)
class PrefixKV:
    """A prefix's keys and values, one (1, H, P, D) tensor per layer, computed once and read by every row."""
    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class RowCache:
    """Each row's own keys/values, (B, H, C, D) per layer, C the columns reserved so far.

    The part of transformers' Cache protocol that decoder layers call (`update`); the forward's tokens go to
    columns [write_at, write_at + q) and attention reads all C columns, the mask hiding those not yet written.
    C grows by `chunk` columns at a time, so the tensors attention reads are whole (a slice of a larger buffer is
    copied by every batched matmul on CPU) and are reallocated once per chunk. `copy_in` places keys/values
    computed earlier (a `RowStore` entry) before the next forward. A forward may cover only `rows`, a range of
    the batch (prompts whose new parts differ in length run apart); its attention then reads views of them."""

    is_compileable = False
    chunk = 32

    def __init__(self, layers: int, capacity: int, batch: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.capacity, self.write_at, self.columns, self.batch = capacity, 0, 0, batch
        self.rows = slice(None)  # the rows the next forward computes
        self._pending: list[tuple[int, int, RowKV]] = []  # (row, first column, keys/values) to copy in

    def reserve(self, end: int) -> int:
        """Make room for columns [0, end) -> C, the columns the next forward attends over."""
        if end > self.columns:
            self.columns = min(self.capacity, max(end, self.columns + self.chunk))
        return self.columns

    def copy_in(self, row: int, column: int, kv: RowKV) -> None:
        self._pending.append((row, column, kv))

    def _grown(self, t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if t is not None and t.shape[2] == self.columns:
            return t
        _, H, _, D = like.shape
        out = like.new_zeros(self.batch if t is None else t.shape[0], H, self.columns, D)
        if t is not None:
            out[:, :, :t.shape[2]] = t
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = self.keys[layer_idx] = self._grown(self.keys[layer_idx], key_states)
        values = self.values[layer_idx] = self._grown(self.values[layer_idx], value_states)
        for row, col, kv in self._pending:
            n = kv.keys[layer_idx].shape[1]
            keys[row, :, col:col + n] = kv.keys[layer_idx]
            values[row, :, col:col + n] = kv.values[layer_idx]
        keys, values = keys[self.rows], values[self.rows]          # views: the batch dimension is outermost
        end = self.write_at + key_states.shape[2]
        keys[:, :, self.write_at:end] = key_states
        values[:, :, self.write_at:end] = value_states
        if layer_idx == len(self.keys) - 1:
            self._pending = []
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write_at

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (B_kept,), in that order."""
        self.keys = [k[rows.to(k.device)] if k is not None else None for k in self.keys]   # layers may be on
        self.values = [v[rows.to(v.device)] if v is not None else None for v in self.values]  # several GPUs

    def drop(self, dead: list[int]) -> list[int]:
        """Remove rows `dead` by moving the last surviving rows into their places and keeping the first rows of each
        tensor (a view: no copy of the rows that stay). -> order: the old index of the row now at each position."""
        B = self.keys[0].shape[0]
        n = B - len(dead)
        gone = set(dead)
        holes = [r for r in sorted(gone) if r < n]
        movers = [r for r in range(n, B) if r not in gone]
        order = list(range(n))
        for dst, src in zip(holes, movers):
            order[dst] = src
        if holes:
            dst, src = torch.tensor(holes), torch.tensor(movers)
            for t in self.keys + self.values:
                t[dst.to(t.device)] = t[src.to(t.device)]
        self.keys = [k[:n] for k in self.keys]
        self.values = [v[:n] for v in self.values]
        return order

    def copy_rows(self, js: list[int], starts: list[int], end: int) -> list[RowKV]:
        """Copies of rows js, row js[i]'s columns [starts[i], end), to keep after the batch is gone (one gather per
        layer for all of them)."""
        if not js:
            return []
        sel = torch.tensor(js)  # moved to each layer's device: a model over several GPUs keeps layers on each
        keys = [k[sel.to(k.device), :, :end] for k in self.keys]                          # gathered: copies
        values = [v[sel.to(v.device), :, :end] for v in self.values]
        return [RowKV([k[i, :, s:] for k in keys], [v[i, :, s:] for v in values]) for i, s in enumerate(starts)]


@dataclass(frozen=True)
class RowKV:
    """One row's keys/values over some columns, (H, n, D) per layer."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def first(self, n: int) -> RowKV:
        return RowKV([k[:, :n] for k in self.keys], [v[:, :n] for v in self.values])


@dataclass(frozen=True)
class StoredRow:
    prefix: PrefixKV | None  # the prefix these keys/values attended to
    ids: tuple[int, ...]     # the row's own tokens (after the prefix) whose keys/values `kv` holds
    kv: RowKV


def common_len(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


@dataclass
class RowStore:
    """Rows of the latest generation call, for the next call's prompts to extend; bounded by `max_bytes`."""
    max_bytes: int
    rows: list[StoredRow] = field(default_factory=list)
    older: list[StoredRow] = field(default_factory=list)  # the call before: still matched until the next call ends

    def new_call(self) -> None:
        self.older, self.rows = self.rows, []

    def add(self, row: StoredRow) -> None:
        used = sum(r.kv.nbytes() for r in self.rows)
        if used + row.kv.nbytes() <= self.max_bytes:
            self.rows.append(row)

    def best(self, prefix: PrefixKV | None, ids: list[int], minimum: int) -> tuple[StoredRow | None, int]:
        """The stored row sharing the longest start with `ids` (own tokens after `prefix`), and that length;
        (None, 0) when none shares `minimum` tokens."""
        found, best = None, minimum - 1
        for r in self.rows + self.older:
            if r.prefix is prefix and r.ids[0] == ids[0]:
                n = common_len(r.ids, ids)
                if n > best:
                    found, best = r, n
        return (found, best) if found else (None, 0)

    def clear(self) -> None:
        self.rows, self.older = [], []


def prefix_attention(module, query, key, value, attention_mask, prefix: PrefixKV | None = None, **kwargs):
    """transformers attention function: attention over [prefix | row columns] when a `prefix` is passed, over the
    row columns otherwise. query (B, H*G, q, D); key/value (B, H, L, D); attention_mask (B, 1, q, L) bool, True =
    attend. -> ((B, q, H*G, D), None), as transformers' sdpa function returns.

    On a CPU sdpa is called with `enable_gqa` (transformers repeats each key/value head per query head when a mask
    is passed: a copy of the whole cache per layer); on a GPU, where a masked sdpa with `enable_gqa` may fall back
    to the math kernel, transformers' own path runs. A prompt's forward copies the prefix per row, a decoding step
    reads it once for all rows (`decode_attention`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pk, pv = (prefix.keys[module.layer_idx], prefix.values[module.layer_idx]) if prefix else (None, None)
    if pk is not None and query.shape[2] == 1:
        return decode_attention(query, key, value, attention_mask, pk, pv, kwargs["scaling"]), None
    if pk is not None:  # (1, H, P, D) -> prepended to every row for this one forward
        B, q = query.shape[0], query.shape[2]
        attention_mask = torch.cat([attention_mask.new_ones(B, 1, q, pk.shape[2]), attention_mask], -1)
        key, value = torch.cat([pk.expand(B, -1, -1, -1), key], 2), torch.cat([pv.expand(B, -1, -1, -1), value], 2)
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(  # no mask: transformers found it all causal
        query, key, value, attn_mask=attention_mask, is_causal=attention_mask is None and query.shape[2] > 1,
        scale=kwargs["scaling"], enable_gqa=True)
    return out.transpose(1, 2), None


def decode_attention(query, key, value, mask, pk, pv, scaling: float) -> torch.Tensor:
    """One new token per row against the prefix (read once for all rows) and its own columns: one softmax over
    both, as attention over the concatenation. -> (B, 1, H*G, D)."""
    B, HG, _, D = query.shape
    H, P = key.shape[1], pk.shape[2]
    G = HG // H
    q = (query * scaling).view(B, H, G, D)                 # scaled once here, not the (B, H, G, P + L) scores
    by_head = q.transpose(0, 1).reshape(H, B * G, D)                                   # every row's queries
    s_prefix = torch.matmul(by_head, pk[0].transpose(1, 2)).view(H, B, G, P).transpose(0, 1)    # (B, H, G, P)
    s_own = torch.matmul(key, q.transpose(2, 3)).transpose(2, 3)                                # (B, H, G, L)
    s_own = s_own.masked_fill(~mask.view(B, 1, 1, -1).to(s_own.device), float("-inf"))
    probs = torch.softmax(torch.cat([s_prefix, s_own], -1), -1)       # accumulates in fp32 for bf16 scores
    out = torch.matmul(probs[..., P:], value)                                                    # (B, H, G, D)
    p_prefix = probs[..., :P].transpose(0, 1).reshape(H, B * G, P)
    out = out + torch.matmul(p_prefix, pv[0]).view(H, B, G, D).transpose(0, 1)
    return out.reshape(B, 1, HG, D)


@contextlib.contextmanager
def prefix_attention_on(model):
    """Run `model`'s attention through `prefix_attention` inside the block (registered once with transformers,
    with sdpa's mask function so that 2D masks still work), then put its own implementation back."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, prefix_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before
