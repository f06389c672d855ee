"""Calibration and agreement metrics for probabilistic labels and reward models. Pure torch.

Expected calibration error (Naeini et al. 2015; Guo et al. 2017, eq. 3): predictions p of a binary
event y are put in `bins` equal-width bins; ECE = Σ_b (n_b / n) |mean(y in b) - mean(p in b)|.
"""
from __future__ import annotations

import torch


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """(N,) probabilities of the event, (N,) 0/1 outcomes -> ECE in [0, 1]."""
    p, y = p.double().flatten(), y.double().flatten()
    index = (p * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.sum().item() / len(p) * abs(y[sel].mean().item() - p[sel].mean().item())
    return total


def soft_agreement(p_model: torch.Tensor, p_label: torch.Tensor) -> float:
    """Fraction of pairs where model and label prefer the same side (ties at 0.5 excluded)."""
    keep = (p_label != 0.5) & (p_model != 0.5)
    if not keep.any():
        return float("nan")
    return ((p_model[keep] > 0.5) == (p_label[keep] > 0.5)).double().mean().item()
