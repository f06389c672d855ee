"""Soft preference labels from a feedback model's option log-probs (Bai et al. 2022, §4.1).

The judge sees options (A) and (B); the soft label is the normalised probability of (A):
    P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) = σ(lp_A - lp_B).
Small judges have strong position bias, so each pair is labelled in both orders and averaged:
with response 1 first, P1 = P(A); with response 2 first, P2 = P(B) = 1 - P(A). Chain-of-thought
labels come out near 0 or 1, and the paper clamps them into [0.4, 0.6] (§4.3).
Pure torch; shapes: N labels.
"""
from __future__ import annotations

import torch


def prob_first(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    """(N,), (N,) option log-probs -> (N,) P(option A), normalised over the two options."""
    return torch.sigmoid(lp_a - lp_b)


def average_orders(p_a_when_1_first: torch.Tensor, p_a_when_2_first: torch.Tensor) -> torch.Tensor:
    """P(response 1 preferred), averaged over both presentation orders."""
    return 0.5 * (p_a_when_1_first + (1.0 - p_a_when_2_first))


def clamp_label(p: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return p.clamp(min=low, max=high)
