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


def dealt_order(lengths: list[int], batch_size: int, world: int, grad_accum: int, key: str,
                group_by_length: bool, epochs: int) -> list[int]:
    """Row indices for `epochs` epochs, for a trainer that reads rows in sequence, cuts them into
    batches of `batch_size` and deals batch i to rank i % world (HF Trainer under accelerate).

    Each optimizer step's rows come from `epoch_order`; within a step, micro-step g of rank r gets
    the step's rows g*world*batch_size + r, + 2r, ... (every world-th, as the reward model's loop deals
    them), so with length grouping every rank holds rows of similar length and none waits for the
    others. Dealing consecutive batches instead gives rank 0 the longer of each pair every step.

    The trainer cuts the whole sequence into steps, so a short last step in an epoch before the last
    would shift every step of the next one: it is completed from the start of its own epoch's order
    (a few rows seen twice, as torch's DistributedSampler pads)."""
    per_micro = batch_size * world
    per_step = per_micro * grad_accum
    order: list[int] = []
    for epoch in range(epochs):
        rows = epoch_order(lengths, per_step, f"{key}|epoch{epoch}", group_by_length)
        short = len(rows) % per_step
        if epoch < epochs - 1 and short:
            rows += [rows[i % len(rows)] for i in range(per_step - short)]
        for start in range(0, len(rows), per_step):
            step = rows[start:start + per_step]
            if len(step) < per_step:  # the short last step: as it comes
                order += step
                continue
            for g in range(0, per_step, per_micro):
                micro = step[g:g + per_micro]
                order += [i for r in range(world) for i in micro[r::world]]
    return order
