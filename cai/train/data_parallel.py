"""Gradient all-reduce for DeepSpeed ZeRO-0 engines without the per-step copies.

ZeRO-0 (plain data parallelism) in DeepSpeed flattens every gradient into a freshly allocated bucket
after each backward, all-reduces it and copies it back: an allocation the size of the model (page faults
on CPU) and two full copies a step. Here every
gradient is a view of one persistent flat buffer that autograd accumulates into, and that buffer is
all-reduced in place (the layout of torch DDP's `gradient_as_bucket_view`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FlatGradients:
    """Installs itself on `engine` (a fp32 ZeRO-0 DeepSpeed engine on more than one rank): DeepSpeed's
    backward calls `engine.allreduce_gradients`, and its step ends with `engine.zero_grad`."""

    def __init__(self, engine):
        self.engine = engine
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.attach()
        # instance attributes shadow the engine's methods of the same names
        engine.allreduce_gradients = self.allreduce
        engine.zero_grad = self.zero_grad

    def attach(self) -> None:
        for p, view in zip(self.params, self.views):
            p.grad = view

    def zero_grad(self) -> None:
        self.flat.zero_()
        self.attach()

    @torch.no_grad()
    def allreduce(self, *args, **kwargs) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return
        for p, view in zip(self.params, self.views):
            # a gradient someone replaced (grad=None, or a new tensor) goes back into the buffer
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view
        self.flat.div_(dist.get_world_size())  # the mean, as DeepSpeed's gradient averaging
        dist.all_reduce(self.flat)
