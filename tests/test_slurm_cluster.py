"""The real single-node Slurm cluster of tests/slurm_cluster.py: a batch job runs, and a job requeues itself on a
signal to its batch shell (the preemption pattern) and runs again under the same id."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .slurm_cluster import SlurmCluster, slurm_cluster

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="starts slurmctld/slurmd/munged as root (and may apt-get install them)")

REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --requeue
#SBATCH --signal=B:USR1@30
#SBATCH --time=5
#SBATCH --open-mode=append
#SBATCH --output=requeue-%j.out
log() { echo "$1 job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT-unset}" >> runs.txt; }
on_usr1() { log preempted; scontrol requeue "$SLURM_JOB_ID"; exit 0; }
trap on_usr1 USR1
log start
if [ -n "$SLURM_RESTART_COUNT" ]; then log finished; exit 0; fi
log ready
while true; do sleep 1 & wait $!; done  # a foreground sleep would hold the trap until it ends; `wait` does not
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SlurmCluster]:
    with slurm_cluster(tmp_path) as c:
        yield c


def test_batch_job_completes(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/bash\n#SBATCH --output=hello-%j.out\n'
                      'echo "$SLURM_JOB_ID ${SLURM_RESTART_COUNT-unset}" > result.txt\n')
    job = cluster.sbatch(script, cwd=tmp_path)
    assert cluster.wait(job, timeout=30) == "COMPLETED"
    assert cluster.job_info(job)["Restarts"] == "0"
    assert (tmp_path / "result.txt").read_text() == f"{job} unset\n"  # SLURM_RESTART_COUNT is only set on reruns


def test_requeue_on_usr1_to_batch_shell(cluster: SlurmCluster, tmp_path: Path) -> None:
    script, runs = tmp_path / "requeue.sh", tmp_path / "runs.txt"
    script.write_text(REQUEUE_SCRIPT)
    job = cluster.sbatch(script, cwd=tmp_path)
    assert cluster.wait(job, timeout=30, until=frozenset({"RUNNING"})) == "RUNNING"
    deadline = time.monotonic() + 30
    while "ready" not in (runs.read_text() if runs.exists() else ""):  # the trap is set before this line
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # --batch: the batch shell only, not its children
    assert cluster.wait(job, timeout=60) == "COMPLETED", cluster.log_tail()
    assert cluster.job_info(job)["Restarts"] == "1"
    first, second = f"job={job} restart=unset", f"job={job} restart=1"
    assert runs.read_text().splitlines() == [f"start {first}", f"ready {first}", f"preempted {first}",
                                             f"start {second}", f"finished {second}"]
