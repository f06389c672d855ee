"""Inference-only models whose weights stay in a file between uses.

PPO runs the reference and preference models once per iteration, during the rollout; held in memory
they also sit through the update, which is the memory peak (the policy's gradients and activations).
Parked, their weights live in a file that is memory-mapped only while they run: clean file pages the
kernel can drop under pressure, and which leave the process's resident set when unmapped. What it costs
and saves is measured in benchmarks/ppo.py (README: Performance).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


def drop_weights(model: torch.nn.Module) -> None:
    """Free every parameter's storage (empty tensors of the same dtype and device); the module keeps
    its structure, and `.data = ...` fills it again."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class ParkedWeights:
    """Owns `model`'s parameters on disk; `with parked.loaded() as model:` maps them in."""

    def __init__(self, model: torch.nn.Module, path: Path):
        self.model, self.path = model, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        # named_parameters() lists a tied weight once, and `.data` on it reaches every place it is used
        torch.save({name: p.detach() for name, p in model.named_parameters()}, tmp)
        tmp.replace(self.path)
        self.park()

    def park(self) -> None:
        drop_weights(self.model)

    @contextmanager
    def loaded(self):
        # private, read-only mapping: pages come from the page cache and are never copied
        weights = torch.load(self.path, mmap=True, weights_only=True)
        try:
            for name, p in self.model.named_parameters():
                p.data = weights[name].to(p.device)
            del weights
            yield self.model
        finally:
            self.park()

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
