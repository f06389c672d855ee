"""Stopping a run early at a safe point, for preemption: Slurm's warning signal (USR1) or TERM.

The driver turns the signal into a stop file in the output folder (shared storage, so workers on every node
see it) and into an event for its own loops. A generation stage starts no new shard and lets those in flight
commit (committed shards are its checkpoint); a training loop checks the file once per step, all ranks agreeing, saves a checkpoint and
returns; the runner then exits with STOPPED_EXIT_CODE instead of marking the stage done. The next run
resumes where it stopped.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from cai.errors import CaiError

STOP_FILE_ENV = "CAI_STOP_FILE"  # set by the driver, forwarded to every worker process
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped at a safe point; run it again to resume
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Stopped(CaiError):
    """The run stopped at a safe point because a stop was requested."""


_event = threading.Event()
_signalled: dict[str, float | str] = {}


def stop_file() -> Path | None:
    value = os.environ.get(STOP_FILE_ENV)
    return Path(value) if value else None


def requested() -> bool:
    """Whether this run was asked to stop: the driver's event, or the stop file (in a worker process)."""
    if _event.is_set():
        return True
    path = stop_file()
    return path is not None and path.exists()


def seconds_since_signal() -> float | None:
    at = _signalled.get("at")
    return None if at is None else time.time() - float(at)


def request(reason: str) -> None:
    """Ask every stage and worker of this run to stop at its next safe point."""
    if not _event.is_set():
        _signalled.update(at=time.time(), reason=reason)
        print(f"cai: {reason}: stopping at the next safe point (committed work is kept)", file=sys.stderr,
              flush=True)
    _event.set()
    path = stop_file()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reason)


def stopped(where: str) -> Stopped:
    waited = seconds_since_signal()
    after = f", {waited:.1f}s after '{_signalled['reason']}'" if waited is not None else ""
    return Stopped(f"stopped at a safe point ({where}){after}; run the same command again to resume")


def check(where: str) -> None:
    """Raise Stopped when a stop was requested (the runner calls it before each stage)."""
    if requested():
        raise stopped(where)


class StopOnSignal:
    """In the driver, for the length of a run: USR1 and TERM request a stop; the stop file lives at `path`
    and is cleared at the start (a stop left by a preempted run must not stop the resumed one)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        _event.clear()
        _signalled.clear()
        self.path.unlink(missing_ok=True)
        os.environ[STOP_FILE_ENV] = str(self.path)
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, lambda s, _f: request(f"got {signal.Signals(s).name}"))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.environ.pop(STOP_FILE_ENV, None)
        self.path.unlink(missing_ok=True)
        _event.clear()  # the signal's time stays, for the exit line


def agreed(device) -> bool:
    """In a training worker, once per step: whether to stop now, the same answer on every rank (a rank that
    saw the file a step before the others would otherwise leave them waiting in a collective)."""
    import torch
    import torch.distributed as dist

    flag = requested()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
