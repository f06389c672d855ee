"""Where code runs: the Ray cluster, the environment of its worker processes, and `worker_init`, the one
place that decides a worker's threads, seed, bf16 support and device.

Every Ray process that touches a model (generation actors, Ray Train workers) starts with `worker_init`
and passes the device it returns to everything it builds; nothing else picks a device.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from cai.errors import CaiError

if TYPE_CHECKING:
    import torch

    from cai.config import RayConfig, TrainConfig

# passed on to every worker process when set in the driver's environment
FORWARDED_ENV = ("CAI_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_HOME")


@dataclass(frozen=True)
class Resources:
    """What one worker process is given, and the config section that asked for it (for error lines)."""
    cpus: float
    gpus: float
    bf16: bool
    section: str
    keep_freed_memory: bool | None = None  # None: glibc's defaults

    @classmethod
    def of_training(cls, train: TrainConfig, section: str) -> Resources:
        return cls(train.cpus_per_worker, train.gpus_per_worker, train.bf16, f"{section}.train",
                   train.keep_freed_memory)

    @classmethod
    def of_generation(cls, ray_cfg: RayConfig) -> Resources:
        # bf16 weights are the model's dtype, not a training mode: no support check (emulated where missing)
        return cls(ray_cfg.cpus_per_actor, ray_cfg.gpus_per_actor, False, "ray")


@dataclass(frozen=True)
class Worker:
    """A worker process after `worker_init`: its device and its place in the process group."""
    device: torch.device
    rank: int
    world: int
    local_rank: int

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def resolve_dtype(self, name: str) -> str:
        """A configured dtype name; `auto` is bfloat16 where this device computes in it natively (GPUs with
        bf16, CPUs with AVX512-BF16 or AMX), else float32 (emulated bf16 is slower than float32)."""
        if name != "auto":
            return name
        return "bfloat16" if bf16_supported(self.device) else "float32"


def worker_init(resources: Resources, seed: int) -> Worker:
    """Threads, seed, bf16 support and device for this process: `cpu`, or `cuda:<i>` for the GPU Ray
    assigned (its index among the GPUs this process can see)."""
    import torch

    torch.set_num_threads(max(1, int(resources.cpus)))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(seed)  # the same on every rank: a freshly initialised head must match across ranks
    device = torch.device("cpu")
    if resources.gpus > 0:
        if not torch.cuda.is_available():
            raise CaiError(f"{resources.section}: asks for GPUs, but torch sees none on this node "
                           f"(a CPU build of torch, or no driver); set the GPUs to 0")
        device = torch.device("cuda", _assigned_gpu_index())
        torch.cuda.set_device(device)
    if resources.bf16 and not bf16_supported(device):
        kind = "GPU" if device.type == "cuda" else "CPU"
        raise CaiError(f"{resources.section}.bf16=true, but this {kind} has no bf16 support; "
                       f"set {resources.section}.bf16=false")
    _attach_deepspeed()
    return Worker(device, rank, world, local_rank)


def _attach_deepspeed() -> None:
    """Hand DeepSpeed the process group Ray Train made, before any model loads: under ZeRO-3, HF's
    from_pretrained builds the model inside deepspeed.zero.Init, which reads the world size from DeepSpeed's
    own comm module; unattached, every rank takes world_size=1 and DeepSpeed rejects HF's batch sizes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _assigned_gpu_index() -> int:
    """Ray sets CUDA_VISIBLE_DEVICES to (a superset of) the GPUs it assigned; torch numbers the visible
    ones from 0."""
    import ray

    if not ray.is_initialized():  # not a Ray worker (the judge-check command): the first visible GPU
        return 0
    ids = [str(i) for i in ray.get_gpu_ids()]
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not ids or not visible:
        return 0
    return visible.index(ids[0]) if ids[0] in visible else 0


def bf16_supported(device: torch.device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def worker_env(resources: Resources) -> dict[str, str]:
    """Environment of a worker's process, read once at its start (glibc reads MALLOC_* then, DeepSpeed
    picks its accelerator then): the accelerator follows the worker's own GPUs, never the driver's."""
    env = {"OMP_NUM_THREADS": str(max(1, int(resources.cpus))), "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cuda" if resources.gpus > 0 else "cpu"}
    if resources.keep_freed_memory is None:
        pass
    elif resources.keep_freed_memory:
        # Every step frees and re-allocates the same activations and gradients; returned to the OS, they
        # come back as fresh pages that each cost a fault. One arena, no mmap, no trim keeps them for reuse.
        env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**34))
    else:
        env["MALLOC_ARENA_MAX"] = "2"  # per-thread arenas would hold freed activations as RSS
    for var in FORWARDED_ENV:
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def start_ray(cfg: RayConfig) -> None:
    """Attach to the configured cluster ($CAI_RAY_ADDRESS or ray.address) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("CAI_RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def stop_ray() -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def require_resources(count: int, each: Resources, what: str) -> None:
    """One line when the cluster cannot hold `count` workers of `each` (CPUs and GPUs both)."""
    import ray

    have = ray.cluster_resources()
    for kind, per in (("CPU", each.cpus), ("GPU", each.gpus)):
        need, total = count * per, have.get(kind, 0)
        if need > total:
            raise CaiError(f"{each.section}: {what}={count} x {per:g} {kind}s each needs {need:g} {kind}s; "
                           f"the Ray cluster has {total:g}")


def remote_result(ref):
    """ray.get, but a CaiError raised on a worker stays a one-line CaiError here."""
    import ray

    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as e:
        cause = getattr(e, "cause", None) or getattr(getattr(e, "error_msg", None), "cause", None)
        if isinstance(cause, CaiError):
            raise CaiError(str(cause)) from None
        raise


def run_training(fn: Callable[[Any], Any], job: Any, train: TrainConfig, ray_cfg: RayConfig, storage,
                 section: str) -> Any:
    """Run `fn(job)` on `train.workers` Ray Train workers (one DeepSpeed rank each); rank 0's return value.

    The job is a frozen object built in the driver; it reaches the workers bound to `fn`, not as a dict."""
    import functools
    import time

    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(ray_cfg)
    each = Resources.of_training(train, section)
    require_resources(train.workers, each, "workers")
    per_worker = {"CPU": each.cpus, **({"GPU": each.gpus} if each.gpus else {})}
    trainer = TorchTrainer(
        functools.partial(fn, job),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=each.gpus > 0,
                                     resources_per_worker=per_worker),
        # a fresh run name each time: Ray Train would otherwise restore its own state from an old run;
        # resuming is ours (checkpoints in the stage folder)
        run_config=RunConfig(name=f"{section}-{int(time.time() * 1000)}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": worker_env(each)}))
    try:
        return trainer.fit().return_value
    except ray.train.WorkerGroupError as e:
        first = e.worker_failures[min(e.worker_failures)]
        if isinstance(first, CaiError):
            raise CaiError(str(first)) from None
        raise


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
