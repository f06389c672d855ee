"""Process helpers shared by the tests and benchmarks/fault_injection.py (no pytest here)."""
from __future__ import annotations

import subprocess


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant at once (Ray's raylet, workers, trainers), the way a
    scheduler kills a job; killing only the driver leaves Ray workers that keep writing for a while."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()
