"""A pool of Ray actors that each load a model once and run shard functions on it.

The driver is the only writer: an actor returns a shard's rows, the driver commits the shard
file. A killed run therefore leaves only whole shards behind, and `map_shards` skips them.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

from cai.config import ModelConfig, RayConfig
from cai.errors import CaiError
from cai.progress import RowProgress
from cai.shards import ShardStore

# fn(generator, rows, seed) -> (output rows, new tokens generated)
ShardFn = Callable[..., tuple[list[dict], int]]


def shard_seed(seed: int, name: str, index: int) -> int:
    """A seed per (run seed, shard family, shard index): redoing a shard redraws the same numbers."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class GenerationActor:
    """One model role per actor: a ChatGenerator built once, reused for every shard."""

    def __init__(self, model: ModelConfig, threads: int):
        import torch

        from cai.generation import ChatGenerator
        from cai.models import load_causal_lm, load_tokenizer, resolve_model

        torch.set_num_threads(max(1, threads))
        path = resolve_model(model.name)
        self.generator = ChatGenerator(load_causal_lm(path, model.dtype), load_tokenizer(path),
                                       model.system_prompt)

    def run(self, fn: ShardFn, rows: list[dict], seed: int) -> tuple[list[dict], int]:
        return fn(self.generator, rows, seed)


def _get(ref):
    """ray.get, but a CaiError raised on a worker stays a one-line CaiError here."""
    import ray

    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as e:
        cause = getattr(e, "cause", None) or getattr(getattr(e, "error_msg", None), "cause", None)
        if isinstance(cause, CaiError):
            raise CaiError(str(cause)) from None
        raise


def start_ray(cfg: RayConfig) -> None:
    """Attach to the configured cluster ($CAI_RAY_ADDRESS or ray.address) or start a local one."""
    import logging

    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("CAI_RAY_ADDRESS") or None
    env = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if "CAI_CACHE" in os.environ:
        env["CAI_CACHE"] = os.environ["CAI_CACHE"]
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env})


class GenerationPool:
    def __init__(self, model: ModelConfig, cfg: RayConfig):
        import ray

        start_ray(cfg)
        cpus = ray.cluster_resources().get("CPU", 0)
        need = cfg.generation_actors * cfg.cpus_per_actor
        if need > cpus:
            raise CaiError(f"ray: generation_actors={cfg.generation_actors} x cpus_per_actor={cfg.cpus_per_actor} "
                           f"needs {need:g} CPUs; the Ray cluster has {cpus:g}")
        actor = ray.remote(GenerationActor).options(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)
        self.actors = [actor.remote(model, int(cfg.cpus_per_actor)) for _ in range(cfg.generation_actors)]

    def map_shards(self, fn: ShardFn, shards: list[list[dict]], store: ShardStore, seed: int, desc: str) -> None:
        """Run `fn` on every shard not yet committed in `store`, committing each as it returns."""
        import ray

        done = store.committed()
        todo = [i for i in range(len(shards)) if i not in done]
        progress = RowProgress(desc, total=sum(map(len, shards)), done=sum(len(shards[i]) for i in done))
        free, running = list(self.actors), {}
        with progress:
            while todo or running:
                while free and todo:
                    i = todo.pop(0)
                    actor = free.pop()
                    ref = actor.run.remote(fn, shards[i], shard_seed(seed, desc, i))
                    running[ref] = (i, actor, time.time())
                ready, _ = ray.wait(list(running), num_returns=1)
                i, actor, _ = running.pop(ready[0])
                rows, new_tokens = _get(ready[0])
                store.commit(i, rows)
                progress.advance(len(shards[i]), new_tokens)
                free.append(actor)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
