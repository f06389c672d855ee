"""One run per output folder: a lock file naming its holder, kept fresh by a heartbeat.

A second `cai run` on a folder in use fails with one line naming the holder. A holder that died does not
keep the folder: on its own host a lock whose process is gone is taken over at once; from another host
(shared storage, where a PID means nothing) once its heartbeat is older than STALE_AFTER seconds.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from cai.errors import CaiError

LOCK = "cai-run.lock"
HEARTBEAT_EVERY = 10.0
STALE_AFTER = 60.0


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # gone, or caught between create and write
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(holder: dict, now: float) -> bool:
    """A dead holder: its process is gone (same host), or its heartbeat stopped (any host)."""
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("heartbeat", 0)) > STALE_AFTER


class RunLock:
    """`with RunLock(output_dir):` holds the folder for this process; released on exit."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _record(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is None and time.time() - self.path.stat().st_mtime < STALE_AFTER:
                    time.sleep(0.2)  # its holder is writing it
                    continue
                if holder is not None and not is_stale(holder, time.time()):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
                    raise CaiError(f"output_dir {self.path.parent}: in use by cai run pid {holder['pid']} on host "
                                   f"{holder['host']} since {since} (lock {self.path}); wait for it to end, or "
                                   f"stop it") from None
                self.path.unlink(missing_ok=True)  # a dead holder's lock
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(self._record())
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
            return
        raise CaiError(f"output_dir {self.path.parent}: could not take the lock {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            tmp = self.path.with_name(f".{LOCK}.{os.getpid()}")
            tmp.write_text(self._record())
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = _holder(self.path)
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
