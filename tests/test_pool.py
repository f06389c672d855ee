"""The generation pool on a real local Ray: an actor that dies in the middle of a shard is started again and the
shard is redone (nothing committed twice or lost); a stop request lets the shards in flight commit, then stops."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cai import stopping
from cai.config import ModelConfig, RayConfig
from cai.shards import ShardStore

pytestmark = pytest.mark.slow


def dies_once(generator, rows: list[dict], seed: int, *, marker: str) -> tuple[list[dict], int]:
    """On the actor: the first call for row 'b' kills the actor's process, as the OOM killer or a lost node would."""
    if rows[0]["x"] == "b" and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
    return [{**r, "pid": os.getpid()} for r in rows], len(rows)


def stops_after_first(generator, rows: list[dict], seed: int, *, stop_file: str) -> tuple[list[dict], int]:
    Path(stop_file).write_text("got SIGUSR1")  # a stop arrives while this shard is in flight
    return rows, 0


def test_a_killed_actor_is_replaced_and_its_shard_redone(tiny_model, tmp_path):
    import functools

    from cai.cluster import stop_ray
    from cai.pool import GenerationPool

    shards = [[{"x": "a"}], [{"x": "b"}], [{"x": "c"}]]
    pool = GenerationPool(ModelConfig(name=str(tiny_model)), RayConfig(cpus_per_actor=1))
    try:
        store = ShardStore(tmp_path / "shards", len(shards))
        pool.map_shards(functools.partial(dies_once, marker=str(tmp_path / "died")), shards, store, 0, "test")
        rows = store.rows()
        assert [r["x"] for r in rows] == ["a", "b", "c"]
        died = int((tmp_path / "died").read_text())
        assert rows[1]["pid"] != died and rows[2]["pid"] != died  # done by the restarted actor

        # a stop during shard 0: it still commits; shards 1 and 2 are not started
        with stopping.StopOnSignal(tmp_path / "_STOP"):
            store = ShardStore(tmp_path / "stopped", len(shards))
            fn = functools.partial(stops_after_first, stop_file=str(tmp_path / "_STOP"))
            with pytest.raises(stopping.Stopped, match="test: 1 of 3 shards committed"):
                pool.map_shards(fn, shards, store, 0, "test")
            assert store.committed() == {0}
    finally:
        pool.shutdown()
        stop_ray()
