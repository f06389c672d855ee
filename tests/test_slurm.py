"""slurm/cai.sbatch on a real Slurm (tests/slurm_cluster.py: munged, slurmctld and slurmd on this machine).

The tiny pipeline is submitted, Slurm's warning signal reaches the job in the middle of SFT, the job stops at a
safe point, requeues itself, starts again under the same id, resumes, and finishes with the outputs of the
uninterrupted local run (the shared upstream run: same config, same seeds)."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO
from .slurm_cluster import slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                                   reason="starts slurmctld, slurmd and munged as root")]
STAGES = "prompts,critique_revise,sft"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def submit(cluster, sbatch_options: list[str], *script_args: str) -> int:
    """sbatch slurm/cai.sbatch from the repo root."""
    return int(cluster.run("sbatch", "--parsable", *sbatch_options, str(REPO / "slurm/cai.sbatch"), *script_args,
                           cwd=REPO).split(";")[0])


def test_sbatch_stops_on_usr1_requeues_and_resumes_to_the_same_outputs(tiny_model, tiny_upstream, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    with slurm_cluster(tmp_path / "cluster") as cluster:
        cluster.env.update(CAI_VENV=str(Path(sys.executable).parent.parent), CAI_JOB_DIR=str(tmp_path / "job"),
                           CAI_RAY_WAIT_S="120")
        job = submit(cluster, [f"--output={log}", "--cpus-per-task=2"], "pipelines/tiny.yaml",
                     f"policy.name={tiny_model}", f"output_dir={out}", "--stages", STAGES)
        steps, deadline = out / "sft" / "steps.jsonl", time.time() + 600
        while not steps.exists():  # the first SFT step: the middle of a training stage
            assert time.time() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), log.read_text()
            time.sleep(0.05)
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        state = cluster.wait(job, timeout=900)
        text = log.read_text()
        assert state == "COMPLETED", text + cluster.log_tail()
        assert cluster.job_info(job)["Restarts"] == "1"

    # the timeline: signal -> a checkpoint -> exit 75 -> requeue -> the second start resumes SFT -> done
    marks = ["#0]: got USR1", "stopped at a safe point (sft: checkpoint at step", "#0]: cai exited with 75",
             "#0]: requeueing", "#1]: ray head on", "✓ prompts: up to date", "✓ critique_revise: up to date",
             "✓ sft: done", "#1]: cai exited with 0"]
    at = [text.find(m) for m in marks]
    assert all(i >= 0 for i in at) and at == sorted(at), list(zip(marks, at))
    stopped_at = int(re.search(r"checkpoint at step (\d+)", text).group(1))
    summary = json.loads((out / "sft" / "_COMPLETE.json").read_text())["summary"]
    assert summary["resumed_from"] == f"checkpoint-{stopped_at}" and stopped_at < summary["steps"]
    assert not (tmp_path / "job").exists()  # the job's token folder goes once the run is done

    # the same outputs as the uninterrupted run
    for name in ("sft_revisions.jsonl", "sft_helpful.jsonl"):
        assert (out / "critique_revise" / name).read_text() == (tiny_upstream / "critique_revise" / name).read_text()
    a, b = weights(tiny_upstream / "sft" / "model"), weights(out / "sft" / "model")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert max((a[k].float() - weights(tiny_model)[k].float()).abs().max().item() for k in a if k in
               weights(tiny_model)) > 1e-3  # and SFT did move the weights


def test_sbatch_without_a_pipeline_is_one_line(tmp_path):
    with slurm_cluster(tmp_path / "cluster") as cluster:
        cluster.env.update(CAI_VENV=str(Path(sys.executable).parent.parent), CAI_JOB_DIR=str(tmp_path / "job"))
        job = submit(cluster, [f"--output={tmp_path}/job.out"])
        assert cluster.wait(job, timeout=60) == "FAILED"
    lines = (tmp_path / "job.out").read_text().splitlines()
    assert len(lines) == 1 and "error: usage: sbatch slurm/cai.sbatch PIPELINE.yaml" in lines[0]
