"""Training on Ray Train workers with DeepSpeed: the DeepSpeed config built in code, and the launcher.

The same training function runs on 1 CPU worker in tests and on N GPU workers on a cluster: Ray Train
starts the workers, sets RANK/WORLD_SIZE/MASTER_ADDR and a process group (gloo on CPU, nccl on GPU),
and returns rank 0's return value.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from cai.config import RayConfig, TrainConfig
from cai.errors import CaiError


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
    return {**sizes, "bf16": {"enabled": train.bf16, "check_grad_overflow": True}, "fp16": {"enabled": False},
            "zero_optimization": zero,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def trainer_args(config_cls, section: str, train: TrainConfig, output_dir: str, seed: int, rank: int, **extra):
    """HF/trl training arguments from our typed fields, DeepSpeed on, checkpoints every save_steps.

    use_cpu=True on CPU: without it every rank believes world_size=1 under DeepSpeed."""
    require_bf16_support(train, section)
    return config_cls(
        output_dir=output_dir, per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler, num_train_epochs=train.epochs, max_steps=train.max_steps,
        max_grad_norm=train.max_grad_norm, max_length=train.max_length, save_strategy="steps",
        save_steps=train.save_steps, save_total_limit=2, logging_steps=1, report_to="none",
        use_cpu=train.gpus_per_worker == 0, bf16=train.bf16,
        activation_checkpointing=train.activation_checkpointing > 0,
        activation_checkpointing_kwargs={"every_n_layers": train.activation_checkpointing}
        if train.activation_checkpointing > 1 else None,
        deepspeed=deepspeed_config(train), seed=seed, dataloader_pin_memory=False, disable_tqdm=rank != 0, **extra)


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest HF checkpoint-N that was fully written. HF writes a checkpoint in pieces and
    trainer_state.json last, so a kill mid-save leaves a folder without it: such folders are moved
    out of the way (resume would crash on them) and the previous checkpoint is used."""
    if not os.path.isdir(folder):
        return None
    found = sorted((p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").exists()]
    for partial in (p for p in found if p not in complete):
        if world()[0] == 0:
            shutil.rmtree(partial, ignore_errors=True)
    return str(complete[-1]) if complete else None


def train_hf(trainer_cls, args, config: dict, padding_side: str, rank: int, train: TrainConfig):
    """Build an HF/trl trainer on the base model and the jsonl data, train (resuming from its last
    checkpoint in args.output_dir), save to config['model_tmp']. -> (trainer, train output, resumed from)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from cai.models import load_tokenizer
    from cai.shards import read_jsonl

    class LeanTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            lean_allreduce(trainer.model_wrapped, train)

        def on_step_end(self, args, state, control, **kw):
            # HF saves a full checkpoint (weights + optimizer) after the last step; the model is
            # saved next anyway, and a finished run is never resumed
            if state.global_step >= state.max_steps:
                control.should_save = False

    tokenizer = load_tokenizer(config["base_model"], padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = read_jsonl(config["data"])
    if config.get("order") is not None:  # our row order, for a trainer that reads rows in sequence
        rows = [rows[i] for i in config["order"]]
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[LeanTraining()])
    last = last_complete_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(config["model_tmp"])  # every rank: ZeRO-3 gathers the shards collectively
    if rank == 0:
        tokenizer.save_pretrained(config["model_tmp"])
    return trainer, result, (Path(last).name if last else None)


def lean_allreduce(engine, train: TrainConfig) -> None:
    """After each backward, DeepSpeed ZeRO-0 in fp32 copies every gradient into a fresh flat bucket,
    all-reduces it and copies it back (0.8 s a step for 135M parameters on 2 cores). On one rank that is
    the identity, skipped here; on more, gradients live in one persistent buffer reduced in place
    (cai/data_parallel.py). ZeRO optimizers and the bf16 optimizer reduce in their own hooks."""
    import torch.distributed as dist

    from cai.data_parallel import FlatGradients

    if train.zero_stage != 0 or train.bf16:
        return
    if not dist.is_initialized() or dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    else:
        FlatGradients(engine)


def lean_engine(engine, train: TrainConfig) -> None:
    """Our own loops' DeepSpeed engines (PPO, reward model): Adam's state allocated up front, then the lean
    all-reduce; in this order, since the zero-gradient step would replace FlatGradients' gradient views."""
    allocate_optimizer_state(engine.optimizer, train)
    lean_allreduce(engine, train)


def allocate_optimizer_state(optimizer, train: TrainConfig) -> None:
    """torch's Adam allocates its moments at the first step, amid that step's activations and gradients,
    where they split the heap that later steps reuse. Allocated here instead, by a step with zero
    gradients at learning rate 0 (the parameters do not move) whose step count is then reset: PPO
    in-process peaked 0.17 GB lower and its first step took 7.9 s instead of 14.2 s. ZeRO-0 fp32 only:
    DeepSpeed's ZeRO and bf16 optimizers allocate theirs at start-up."""
    import torch

    if train.zero_stage != 0 or train.bf16:
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


def require_bf16_support(train: TrainConfig, section: str) -> None:
    """bf16 only where the config asks for it and the device has it; else one clear line (in the worker,
    where the device is)."""
    import torch

    if not train.bf16:
        return
    ok = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if train.gpus_per_worker else \
        torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    if not ok:
        raise CaiError(f"{section}.train.bf16=true, but this {'GPU' if train.gpus_per_worker else 'CPU'} has no "
                       f"bf16 support; set {section}.train.bf16=false")


def run_training(fn: Callable[[dict], Any], config: dict, train: TrainConfig, ray_cfg: RayConfig,
                 storage: Path, name: str) -> Any:
    """Run `fn(config)` on `train.workers` Ray Train workers; return rank 0's return value."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cai.pool import start_ray

    start_ray(ray_cfg)
    cpus = ray.cluster_resources().get("CPU", 0)
    if train.workers * train.cpus_per_worker > cpus:
        raise CaiError(f"{name}.train: workers={train.workers} x cpus_per_worker={train.cpus_per_worker:g} needs "
                       f"{train.workers * train.cpus_per_worker:g} CPUs; the Ray cluster has {cpus:g}")
    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if train.gpus_per_worker else {})}
    trainer = TorchTrainer(
        fn, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        # a fresh run name each time: Ray Train would otherwise restore its own state from an old run;
        # resuming is ours (trainer checkpoints in the stage folder)
        run_config=RunConfig(name=f"{name}-{int(time.time() * 1000)}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": worker_env(train)}))
    try:
        return trainer.fit().return_value
    except ray.train.WorkerGroupError as e:
        first = e.worker_failures[min(e.worker_failures)]
        if isinstance(first, CaiError):
            raise CaiError(str(first)) from None
        raise


def worker_env(train: TrainConfig) -> dict[str, str]:
    """Environment of the training workers' processes (glibc reads MALLOC_* once, at start)."""
    accelerator = os.environ.get("DS_ACCELERATOR", "cuda" if train.gpus_per_worker else "cpu")
    env = {"OMP_NUM_THREADS": str(int(train.cpus_per_worker)), "DS_ACCELERATOR": accelerator,
           "TOKENIZERS_PARALLELISM": "false"}
    if train.keep_freed_memory:
        # Every step frees and re-allocates the same activations and gradients. By default glibc gives
        # tensors over 32 MB (64 MB in the training thread's own arena) back to the OS, and each fresh
        # page then costs a fault: on the 2-core VM we measure on, 3 s per GiB. One arena, no mmap, no
        # trim keeps them for reuse: PPO steps 5-7% faster under Ray (20% in-process), same peak.
        env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**34))
    else:
        env["MALLOC_ARENA_MAX"] = "2"  # per-thread arenas would hold freed activations as RSS
    for var in ("CAI_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def world() -> tuple[int, int]:
    """(rank, world size) inside a training worker."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
