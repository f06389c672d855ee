"""Training losses, pure torch. Shapes: B batch.

Soft Bradley-Terry (Bai et al. 2022, §1.2 and §4.1; Bradley & Terry 1952): with target
p = P(A preferred) and scalar rewards r_A, r_B,
    loss = -[p * log σ(r_A - r_B) + (1 - p) * log σ(r_B - r_A)].
With p in {0, 1} this is the usual pairwise loss -log σ(r_chosen - r_rejected); soft targets from
the AI feedback model keep its uncertainty instead of rounding it away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_bradley_terry(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """(B,), (B,), (B,) -> scalar mean loss. logsigmoid keeps large margins finite."""
    margin = r_a - r_b
    return -(p_a * F.logsigmoid(margin) + (1 - p_a) * F.logsigmoid(-margin)).mean()
