"""Two Ray nodes on this machine (`ray start` with their own temp folders and ports, one shared token):
a generation stage and a 2-worker training stage run across both, and a pipeline asking for more than the
cluster has fails with one line before any work starts."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import cai, error_line

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_ports(first_worker_port: int) -> list[str]:
    """Every port a Ray node opens, so that two nodes on one host never meet."""
    names = ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)))] + [
        f"--min-worker-port={first_worker_port}", f"--max-worker-port={first_worker_port + 99}"]


@contextlib.contextmanager
def two_ray_nodes(tmp: Path, cpus_each: int = 1):
    """A head and a worker node, 1 CPU each, with token authentication; yields (address, env). Their temp
    folders are short: Ray's socket paths must fit in 107 bytes."""
    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (tmp / "token").write_text(secrets.token_hex(16))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "token"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("CAI_RAY_ADDRESS", None)
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    common = [f"--num-cpus={cpus_each}", "--num-gpus=0", f"--object-store-memory={300 * 2**20}", "--block"]
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", f"--temp-dir={short}/a", *common, *node_ports(21000)],
                            env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
    nodes = [head]
    try:
        cai("cluster", "wait", "--address", address, "--nodes", "1", "--timeout", "120", env=env)
        nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                       f"--temp-dir={short}/b", *common, *node_ports(22000)],
                                      env=env, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT))
        cai("cluster", "wait", "--address", address, "--nodes", "2", "--cpus", str(2 * cpus_each),
            "--timeout", "120", env=env)
        yield address, env
    finally:
        for proc in reversed(nodes):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(short, ignore_errors=True)


def test_generation_and_training_across_two_nodes(tiny_model, tiny_upstream, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out, ignore=shutil.ignore_patterns("critique_revise", "sft", "preferences",
                                                                       "reward_model"))  # its prompts only
    with two_ray_nodes(tmp_path) as (address, env):
        line = error_line(cai("cluster", "wait", "--address", address, "--nodes", "3", "--timeout", "3", check=False,
                              env=env))
        assert f"Ray cluster at {address}: 2 of 3 nodes, 2 CPUs (need 0)" in line
        env = {**env, "CAI_RAY_ADDRESS": address}
        # more than the cluster has: one line, before anything is written
        line = error_line(cai("run", "pipelines/tiny.yaml", f"policy.name={tiny_model}", f"output_dir={out}",
                              "sft.train.workers=3", "--stages", "sft", check=False, env=env))
        assert "sft.train: workers=3 x 1 CPUs each needs 3 CPUs; the Ray cluster has 2" in line
        assert not (out / "sft").exists()
        # 2 actors of 1 CPU and 2 training workers of 1 CPU: only possible with one on each node
        proc = cai("run", "pipelines/tiny.yaml", f"policy.name={tiny_model}", f"output_dir={out}",
                   "ray.generation_actors=2", "sft.train.workers=2", "--stages", "prompts,critique_revise,sft",
                   env=env)
    assert "✓ prompts: up to date" in proc.stderr and "✓ sft: done" in proc.stderr
    summary = json.loads((out / "sft" / "_COMPLETE.json").read_text())["summary"]
    assert summary["workers"] == 2 and summary["steps"] > 0
    # the same rows as the single-node run: shards are seeded per shard, not per actor
    for name in ("sft_revisions.jsonl", "sft_helpful.jsonl"):
        assert (out / "critique_revise" / name).read_text() == (tiny_upstream / "critique_revise" / name).read_text()
    assert list(out.glob(".probe-*")) == []  # the shared-folder probe cleaned up after itself
