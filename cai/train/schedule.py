"""Learning-rate schedules for our own training loops (reward model, PPO), pure Python: the multiplier of
the base learning rate at each optimizer step, as HF's `get_scheduler` defines them (linear warmup from 0
over `warmup` steps, then constant, linear decay to 0, or half a cosine to 0 at `total` steps)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier for the learning rate used by optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {kind!r} (constant, linear, cosine)")
