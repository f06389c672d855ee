"""Adam's moments allocated before the first step change nothing about the steps that follow."""
from __future__ import annotations

import copy

import torch

from cai.config import TrainConfig
from cai.train.deepspeed import allocate_optimizer_state


def _steps(primed: bool, fused: bool) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    if primed:
        before = [p.detach().clone() for p in model.parameters()]
        allocate_optimizer_state(optimizer, TrainConfig(zero_stage=0, bf16=False))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing moved
        assert all(p.grad is None for p in model.parameters())
        state = optimizer.state[model[0].weight]
        assert float(state["step"]) == 0.0 and float(state["exp_avg"].abs().max()) == 0.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 5, generator=gen)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()], optimizer.state_dict()


def test_allocated_optimizer_state_gives_bit_identical_steps():
    for fused in (True, False):
        lazy, lazy_state = _steps(primed=False, fused=fused)
        primed, primed_state = _steps(primed=True, fused=fused)
        assert all(torch.equal(a, b) for a, b in zip(lazy, primed))
        for k, s in lazy_state["state"].items():
            t = primed_state["state"][k]
            assert float(s["step"]) == float(t["step"]) == 3.0
            assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


def test_optimizer_state_is_left_lazy_where_deepspeed_owns_it():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    allocate_optimizer_state(optimizer, TrainConfig(zero_stage=2, bf16=False))
    allocate_optimizer_state(optimizer, TrainConfig(zero_stage=0, bf16=True))
    assert len(optimizer.state) == 0


def test_a_resumed_optimizer_loads_over_allocated_state():
    """A run resumed from a checkpoint allocates, then loads the saved state over it: the next step is
    the uninterrupted run's."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        allocate_optimizer_state(optimizer, TrainConfig(zero_stage=0, bf16=False))
        return model, optimizer

    def step(model, optimizer, seed):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    a, opt_a = make()
    for seed in (1, 2):
        step(a, opt_a, seed)
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a checkpoint's own tensors, as torch.load gives
    step(a, opt_a, 3)
    step(b, opt_b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert float(opt_b.state[b.weight]["step"]) == 3.0
