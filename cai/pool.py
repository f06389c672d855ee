"""A pool of Ray actors that each load a model once, on their own device, and run shard functions on it.

The driver is the only writer: an actor returns a shard's rows, the driver commits the shard
file. A killed run therefore leaves only whole shards behind, and `map_shards` skips them.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

from cai import stopping
from cai.cluster import Resources, remote_result, require_resources, start_ray, worker_env, worker_init
from cai.config import ModelConfig, RayConfig
from cai.progress import RowProgress, log_line
from cai.shards import ShardStore

# fn(generator, rows, seed) -> (output rows, new tokens generated)
ShardFn = Callable[..., tuple[list[dict], int]]


def shard_seed(seed: int, name: str, index: int) -> int:
    """A seed per (run seed, shard family, shard index): redoing a shard redraws the same numbers."""
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_chat_generator(model: ModelConfig, worker, resources: Resources):
    """A ChatGenerator on the worker's device (a model over several GPUs: its layers spread over them)."""
    from cai.generation import ChatGenerator
    from cai.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(model.name)
    if resources.gpus > 1:  # inputs go to the first of the actor's GPUs
        weights = load_causal_lm(path, worker.resolve_dtype(model.dtype), device_map="auto")
    else:
        weights = load_causal_lm(path, worker.resolve_dtype(model.dtype)).to(worker.device)
    # an actor's weights never change, so prefixes and rows it computed serve its later calls
    return ChatGenerator(weights, load_tokenizer(path), model.system_prompt, worker.device, reuse_kv=True)


class GenerationActor:
    """One model role per actor: a model built once on the actor's device by `load` (a ChatGenerator unless
    told otherwise), reused for every shard."""

    def __init__(self, model: ModelConfig, resources: Resources, load: Callable = load_chat_generator):
        self.generator = load(model, worker_init(resources, seed=0), resources)

    def run(self, fn: ShardFn, rows: list[dict], seed: int) -> tuple[list[dict], int]:
        return fn(self.generator, rows, seed)


class GenerationPool:
    def __init__(self, model: ModelConfig, cfg: RayConfig, load: Callable = load_chat_generator):
        import ray

        start_ray(cfg)
        count, each = Resources.of_generation(cfg, model)
        require_resources(count, each, "generation_actors")
        # an actor that dies (a node lost, a killed process) is started again and its shard redone
        actor = ray.remote(GenerationActor).options(num_cpus=each.cpus, num_gpus=each.gpus, max_restarts=3,
                                                    max_task_retries=3, runtime_env={"env_vars": worker_env(each)})
        self.actors = [actor.remote(model, each, load) for _ in range(count)]

    def map_shards(self, fn: ShardFn, shards: list[list[dict]], store: ShardStore, seed: int, desc: str) -> None:
        """Run `fn` on every shard not yet committed in `store`, committing each as it returns."""
        import ray

        done = store.committed()
        todo = [i for i in range(len(shards)) if i not in done]
        progress = RowProgress(desc, total=sum(map(len, shards)), done=sum(len(shards[i]) for i in done))
        free, running = list(self.actors), {}
        with progress:
            while todo or running:
                if stopping.requested() and todo:  # preemption: no new shard; those in flight still commit
                    todo.clear()
                    log_line(f"{desc}: stopping, waiting for {len(running)} shard(s) in flight")
                while free and todo:
                    i = todo.pop(0)
                    actor = free.pop()
                    ref = actor.run.remote(fn, shards[i], shard_seed(seed, desc, i))
                    running[ref] = (i, actor, time.time())
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                if not ready:
                    progress.heartbeat(len(running))
                    continue
                i, actor, _ = running.pop(ready[0])
                rows, new_tokens = remote_result(ready[0])
                store.commit(i, rows)
                progress.advance(len(shards[i]), new_tokens)
                free.append(actor)
        if len(store.committed()) < len(shards):  # stopped: the committed shards are the checkpoint
            raise stopping.stopped(f"{desc}: {len(store.committed())} of {len(shards)} shards committed")

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
