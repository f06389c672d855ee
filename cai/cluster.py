"""Where code runs: the Ray cluster, the environment of its worker processes, and `worker_init`, the one
place that decides a worker's threads, seed, bf16 support and device.

Every Ray process that touches a model (generation actors, Ray Train workers) starts with `worker_init`
and passes the device it returns to everything it builds; nothing else picks a device.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from cai.errors import CaiError

if TYPE_CHECKING:
    import torch

    from cai.config import ModelConfig, RayConfig, TrainConfig

# passed on to every worker process when set in the driver's environment
FORWARDED_ENV = ("CAI_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_HOME", "CAI_STOP_FILE")


@dataclass(frozen=True)
class Resources:
    """What one worker process is given, and the config section that asked for it (for error lines)."""
    cpus: float
    gpus: float
    bf16: bool | Literal["auto"]  # as TrainConfig.bf16; worker_init decides `auto` for its device
    section: str
    keep_freed_memory: bool | None = None  # None: glibc's defaults

    @classmethod
    def of_training(cls, train: TrainConfig, section: str) -> Resources:
        return cls(train.cpus_per_worker, train.gpus_per_worker, train.bf16, f"{section}.train",
                   train.keep_freed_memory)

    @classmethod
    def of_generation(cls, ray_cfg: RayConfig, model: ModelConfig) -> tuple[int, Resources]:
        """(actors, each) of the generation pool holding `model`: its own counts where it sets them."""
        # bf16 weights are the model's dtype, not a training mode: no support check (emulated where missing)
        gpus = ray_cfg.gpus_per_actor if model.gpus_per_actor is None else model.gpus_per_actor
        return model.actors or ray_cfg.generation_actors, cls(ray_cfg.cpus_per_actor, gpus, False, "ray")


@dataclass(frozen=True)
class Worker:
    """A worker process after `worker_init`: its device and its place in the process group."""
    device: torch.device
    rank: int
    world: int
    local_rank: int
    bf16: bool = False  # trains in bf16 mixed precision (`auto` decided for this device)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def resolve_dtype(self, name: str) -> str:
        """A configured dtype name; `auto` is bfloat16 where this device computes in it natively (GPUs with
        bf16, CPUs with AVX512-BF16 or AMX), else float32 (emulated bf16 is slower than float32)."""
        if name != "auto":
            return name
        return "bfloat16" if bf16_supported(self.device) else "float32"

    def decided(self, train: TrainConfig) -> TrainConfig:
        """`train` with its bf16 decided for this device, for everything the worker builds from it."""
        return train.model_copy(update={"bf16": self.bf16})

    def training_attention(self):
        """A block for training forwards (their backwards follow the kernel the forward picked): sdpa's math
        kernel where bf16 training runs on a CPU. In PPO's update there, the flash kernel's bf16 backward (many small
        oneDNN GEMMs) took most of the backward; SFT-length rows (256 tokens) train faster with flash, so only PPO
        asks for this block (README: Performance)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH]) if self.bf16 and not self.on_gpu else contextlib.nullcontext()


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
    supported = bf16_supported(device)
    bf16 = supported if resources.bf16 == "auto" else resources.bf16
    if bf16 and not supported:
        kind = "GPU" if device.type == "cuda" else "CPU"
        raise CaiError(f"{resources.section}.bf16=true, but this {kind} has no bf16 support; "
                       f"set {resources.section}.bf16=false or auto")
    _attach_deepspeed()
    return Worker(device, rank, world, local_rank, bf16)


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
    address = cluster_address(cfg)
    if address is not None and address != "auto" and not _answers(address):
        raise CaiError(f"Ray cluster at {address}: nothing answers there; is it up?")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as e:
        if address is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaiError(f"Ray cluster at {address}: cannot connect ({first}); is it up, and is this process given "
                       f"the cluster's token (RAY_AUTH_TOKEN_PATH)?") from None


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


def cluster_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("CAI_RAY_ADDRESS") or None


def check_cluster(cfg: RayConfig, needs: list[tuple[int, Resources]], out: Path) -> None:
    """On a cluster named by address (Slurm, a multi-node Ray), before any work: every stage's workers fit,
    and every node sees the output folder. A local Ray starts later, when a stage first needs it."""
    if cluster_address(cfg) is None:
        return
    start_ray(cfg)
    for count, each in needs:
        require_resources(count, each, "workers" if each.section.endswith(".train") else "generation_actors")
    check_shared_folder(out)


def check_shared_folder(out: Path) -> None:
    """A probe file written here must read back the same on every alive node; one line names a node that
    cannot see it (the output folder must be on storage every node mounts)."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = secrets.token_hex(8)
    probe = Path(out).resolve() / f".probe-{token}"
    probe.write_text(token)
    read = ray.remote(num_cpus=0)(_read_probe)
    try:
        seen = ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(str(probe)) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    for node, got in zip(nodes, seen):
        if got != token:
            raise CaiError(f"output_dir {out}: node {node['NodeManagerAddress']} cannot read {probe} "
                           f"({got or 'missing'}); put output_dir on storage that every node mounts at the same path")


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def wait_for_cluster(address: str, nodes: int, cpus: float, gpus: float, timeout: float) -> dict:
    """Poll the cluster at `address` until `nodes` alive nodes with at least `cpus` CPUs and `gpus` GPUs have
    joined; one line on timeout naming what is missing. -> what it has."""
    import time

    import ray

    deadline = time.time() + timeout
    while not _answers(address):  # ray.init would wait long on an address where nothing listens
        if time.time() > deadline:
            raise CaiError(f"Ray cluster at {address}: nothing answers there after {timeout:g}s; did its head start?")
        time.sleep(1)
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            have = {"nodes": len(alive), "CPU": sum(n["Resources"].get("CPU", 0) for n in alive),
                    "GPU": sum(n["Resources"].get("GPU", 0) for n in alive)}
            if have["nodes"] >= nodes and have["CPU"] >= cpus and have["GPU"] >= gpus:
                return have
            if time.time() > deadline:
                raise CaiError(f"Ray cluster at {address}: {have['nodes']} of {nodes} nodes, {have['CPU']:g} CPUs "
                               f"(need {cpus:g}), {have['GPU']:g} GPUs (need {gpus:g}) after {timeout:g}s; see the "
                               f"missing nodes' Ray logs (a node that failed to start, or a Ray token mismatch)")
            time.sleep(2)
    finally:
        ray.shutdown()


def _answers(address: str) -> bool:
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


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


def run_training(fn: Callable[[Any], Any], job: Any, train: TrainConfig, ray_cfg: RayConfig, out: Path,
                 section: str, steps_log: Path | None = None, total: int | None = None,
                 info: Callable[[dict], tuple[str, list[str]]] | None = None) -> dict:
    """Run `fn(job)` on `train.workers` Ray Train workers (one DeepSpeed rank each); rank 0's return value.

    The job is a frozen object built in the driver; it reaches the workers bound to `fn`, not as a dict.
    Progress comes from the step records rank 0 appends to `steps_log` (default <out>/steps.jsonl). A worker
    that stopped for a stop request returns {"stopped": True} after its checkpoint; that raises Stopped here."""
    import functools
    import time

    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cai import progress, stopping

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
        run_config=RunConfig(name=f"{section}-{int(time.time() * 1000)}", storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": worker_env(each)}))
    try:
        with progress.following(steps_log or out / progress.STEPS, section, total, info or progress.step_info):
            result = trainer.fit().return_value
    except ray.train.WorkerGroupError as e:
        first = e.worker_failures[min(e.worker_failures)]
        if isinstance(first, CaiError):
            raise CaiError(str(first)) from None
        raise
    if result.get("stopped"):
        raise stopping.stopped(f"{section}: checkpoint at step {result.get('step')}")
    return result


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
