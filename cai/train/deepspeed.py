"""DeepSpeed for our own training loops (reward model, PPO) and the HF stages: the config built in code from
typed fields, an engine with its optimizer and schedule, and ZeRO-3 weight gathering."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

from cai.config import TrainConfig


def decided_bf16(train: TrainConfig) -> bool:
    """`train.bf16` as a worker decided it (`Worker.decided`): `auto` depends on the device, unknown here."""
    if not isinstance(train.bf16, bool):
        raise ValueError("train.bf16 is 'auto': the worker decides it for its device (Worker.decided) first")
    return train.bf16


def deepspeed_config(train: TrainConfig, hf_auto: bool = True, world_size: int | None = None) -> dict:
    """A DeepSpeed config from typed fields. With `hf_auto`, HF Trainer fills batch sizes and clipping
    from its own arguments (values given here would have to match them exactly)."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else save_model writes no weights
    if hf_auto:
        sizes = {k: "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                     "train_batch_size", "gradient_clipping")}
    else:
        world = world_size or train.workers
        sizes = {"train_micro_batch_size_per_gpu": train.batch_size,
                 "gradient_accumulation_steps": train.grad_accum,
                 "train_batch_size": train.batch_size * train.grad_accum * world,
                 "gradient_clipping": train.max_grad_norm}
    # check_grad_overflow: a step whose gradient norm is not finite is skipped (and counted) in bf16 too
    return {**sizes, "bf16": {"enabled": decided_bf16(train), "check_grad_overflow": True}, "fp16": {"enabled": False},
            "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def build_engine(model, train: TrainConfig, world: int, total_steps: int, learning_rate: float | None = None):
    """A DeepSpeed engine for `model`: fused AdamW, the configured schedule (warmup, then constant, linear or
    cosine; stepped by the engine and saved in its checkpoints), Adam's state allocated up front and the
    lean all-reduce. The model must already be on the worker's device."""
    import deepspeed
    import torch

    from cai.train.schedule import lr_multiplier

    lr = learning_rate if learning_rate is not None else train.learning_rate
    # fused AdamW: one vectorised pass per tensor (the for-loop one re-reads every tensor per operation,
    # the multi-tensor one allocates temporaries the size of all parameters at once)
    # only what trains: a LoRA model's frozen base needs no optimizer state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    schedule = functools.partial(lr_multiplier, total=total_steps, warmup=train.warmup_steps, kind=train.lr_scheduler)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, hf_auto=False, world_size=world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    lean_engine(engine, train)
    return engine


def lean_allreduce(engine, train: TrainConfig) -> None:
    """After each backward, DeepSpeed ZeRO-0 in fp32 copies every gradient into a fresh flat bucket,
    all-reduces it and copies it back. On one rank that is the identity, skipped here; on more, gradients
    live in one persistent buffer reduced in place (cai/train/data_parallel.py). ZeRO optimizers and the
    bf16 optimizer reduce in their own hooks (and keep the gradient norm, which keep_grad_norm adds here)."""
    import torch.distributed as dist

    from cai.train.data_parallel import FlatGradients

    if train.zero_stage != 0 or decided_bf16(train):
        return
    keep_grad_norm(engine)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    else:
        FlatGradients(engine)


def keep_grad_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 step clips the gradients and drops their norm, so `get_global_grad_norm()` (the
    logs' grad_norm, the HF Trainer's too) stays None; its ZeRO and bf16 optimizers keep theirs. Kept here."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep() -> None:
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep  # an instance attribute shadows the engine's method


def lean_engine(engine, train: TrainConfig) -> None:
    """Adam's state allocated up front, then the lean all-reduce; in this order, since the zero-gradient
    step would replace FlatGradients' gradient views."""
    allocate_optimizer_state(engine.optimizer, train)
    lean_allreduce(engine, train)


def allocate_optimizer_state(optimizer, train: TrainConfig) -> None:
    """torch's Adam allocates its moments at the first step, amid that step's activations and gradients,
    where they split the heap that later steps reuse. Allocated here instead, by a step with zero
    gradients at learning rate 0 (the parameters do not move) whose step count is then reset.
    ZeRO-0 fp32 only: DeepSpeed's ZeRO and bf16 optimizers allocate theirs at start-up."""
    import torch

    if train.zero_stage != 0 or decided_bf16(train):
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p in params:
        p.grad = None
        state = optimizer.state[p]
        if torch.is_tensor(state["step"]):
            state["step"].zero_()
        else:
            state["step"] = 0


def gathered(module, zero_stage: int, modifier_rank: int | None = None):
    """A block in which a ZeRO-3 module holds its whole weights (every rank must enter it); a no-op below
    ZeRO-3. Saving and generating need the whole weights."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank)


def grad_norm(engine) -> float | None:
    """The last step's gradient norm before clipping; None where DeepSpeed keeps none."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def frozen_weights(engine) -> bool:
    """A LoRA engine: its checkpoints leave out the frozen base (read again from the base model at start) and
    load without it."""
    return any(not p.requires_grad for p in engine.module.parameters())


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])
