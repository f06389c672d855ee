"""Activation checkpointing in our own training loops (PPO, reward model): a checkpointed decoder layer
keeps only its input and recomputes the rest during backward. The HF Trainer stages (SFT, DPO) get the
same through `activation_checkpointing` in their arguments.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def enable(model: torch.nn.Module, every_n_layers: int) -> None:
    """Checkpoint every N-th decoder layer (1: all of them); 0 leaves the model as it is."""
    if every_n_layers:
        model.activation_checkpointing_enable(every_n_layers=every_n_layers)


@contextmanager
def recomputing(*models: torch.nn.Module):
    """For the block, the checkpointed layers recompute in backward. transformers checkpoints a layer only
    while that layer's own `training` flag is set; only that flag changes, so dropout keeps its mode and
    generation outside the block keeps its KV cache."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for model in models for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    before = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.training = flag
