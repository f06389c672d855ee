"""Epoch orders for training loops: shuffled, optionally grouped by length so that the rows of one
step pad to similar widths (padding is compute thrown away: one long row in a batch of short ones
can double a step's cost). Pure Python, seeded by a string key, the same on every rank."""
from __future__ import annotations

import random


def epoch_order(lengths: list[int], per_step: int, key: str, group_by_length: bool,
                window_steps: int = 50) -> list[int]:
    """Row indices for one epoch; step k trains on order[k*per_step:(k+1)*per_step].

    With `group_by_length`: shuffle, sort each window of `window_steps` steps by length (longest
    first), cut it into steps, then shuffle the steps, so batches stay random in content and order
    while each one holds rows of similar length."""
    rng = random.Random(key)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length or per_step <= 1:
        return order
    window = per_step * window_steps
    steps: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        steps += [chunk[k:k + per_step] for k in range(0, len(chunk), per_step)]
    full, rest = [s for s in steps if len(s) == per_step], [s for s in steps if len(s) < per_step]
    rng.shuffle(full)
    return [i for step in full + rest for i in step]  # a short last step stays last (it is dropped)
