"""Activation checkpointing in our own loops: the checkpointed layers run twice (forward, and again in
backward) inside `recomputing` only, the gradients are the same, and no module changes mode."""
from __future__ import annotations

import torch

from cai.train import recompute as checkpointing
from cai.models import load_causal_lm


def _grads_and_attention_calls(model, recompute: bool) -> tuple[list[torch.Tensor], int]:
    calls = []
    hooks = [layer.self_attn.register_forward_hook(lambda *a: calls.append(1)) for layer in model.model.layers]
    ids = torch.arange(3, 23).reshape(2, 10)
    model.zero_grad(set_to_none=True)
    with checkpointing.recomputing(model) if recompute else torch.enable_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return [p.grad.clone() for p in model.parameters()], len(calls)


def test_recomputed_layers_give_the_same_gradients_and_run_twice(tiny_model):
    model = load_causal_lm(tiny_model)
    layers = len(model.model.layers)
    plain, plain_calls = _grads_and_attention_calls(model, recompute=False)
    assert plain_calls == layers
    checkpointing.enable(model, every_n_layers=1)
    outside, outside_calls = _grads_and_attention_calls(model, recompute=False)
    assert outside_calls == layers  # enabled, but nothing recomputes outside the block
    inside, inside_calls = _grads_and_attention_calls(model, recompute=True)
    assert inside_calls == 2 * layers
    for a, b in zip(plain, inside):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not any(m.training for m in model.modules())  # every flag is back, dropout never left eval


def test_every_second_layer_recomputes_half(tiny_model):
    model = load_causal_lm(tiny_model)
    layers = len(model.model.layers)
    checkpointing.enable(model, every_n_layers=2)
    _, calls = _grads_and_attention_calls(model, recompute=True)
    assert calls == layers + (layers + 1) // 2
    checkpointing.enable(load_causal_lm(tiny_model), every_n_layers=0)  # 0: off, and no error
