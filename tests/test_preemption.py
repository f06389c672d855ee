"""Stopping for preemption without Slurm (tests/test_slurm.py has the real one): USR1 in the middle of the
reward model's loop checkpoints the step in flight and exits 75, and the next run resumes there; a second
run on a folder in use gets one line naming the holder."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cai.run_lock import RunLock
from cai.stopping import STOPPED_EXIT_CODE

from .conftest import REPO, cai, error_line
from .test_ppo import args, copy_run

pytestmark = pytest.mark.slow


def test_usr1_mid_reward_model_checkpoints_then_resumes(tiny_model, tiny_upstream, tmp_path):
    out = copy_run(tiny_upstream, tmp_path / "run")
    shutil.rmtree(out / "reward_model")  # its steps.jsonl would be taken for this run's
    extra = ["--stages", "reward_model", "reward_model.train.epochs=20", "reward_model.train.save_steps=1000"]
    env = {k: v for k, v in os.environ.items() if k != "CAI_RAY_ADDRESS"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *args(tiny_model, out, *extra)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        steps = out / "reward_model" / "steps.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not steps.exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == STOPPED_EXIT_CODE
    stderr = (tmp_path / "stderr.txt").read_text()
    line = [ln for ln in stderr.splitlines() if "stopped at a safe point" in ln]
    assert len(line) == 1 and "reward_model: checkpoint at step" in line[0] and "from signal to exit" in line[0]
    at = int(line[0].split("checkpoint at step ")[1].split(")")[0])
    first = [json.loads(ln)["step"] for ln in steps.read_text().splitlines()]
    assert first == list(range(1, at + 1)) and not (out / "reward_model" / "_COMPLETE.json").exists()
    assert (out / "reward_model" / "checkpoints" / "latest").exists()
    assert "partial" in cai("status", str(out)).stdout.split("reward_model")[1].splitlines()[0]

    cai(*args(tiny_model, out, *extra))
    summary = json.loads((out / "reward_model" / "_COMPLETE.json").read_text())["summary"]
    assert summary["resumed_from_step"] == at < summary["steps"]
    assert [json.loads(ln)["step"] for ln in steps.read_text().splitlines()] == list(range(1, summary["steps"] + 1))


def test_second_run_on_a_folder_in_use_is_one_line(tiny_model, tiny_upstream, tmp_path):
    out = copy_run(tiny_upstream, tmp_path / "run")
    with RunLock(out):
        line = error_line(cai(*args(tiny_model, out, "--stages", "sft"), check=False))
    assert f"in use by cai run pid {os.getpid()}" in line and "cai-run.lock" in line
