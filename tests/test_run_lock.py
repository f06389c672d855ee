"""One run per output folder: the lock names its holder, and a dead holder does not keep it."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cai.errors import CaiError
from cai.run_lock import LOCK, STALE_AFTER, RunLock


def test_second_holder_gets_one_line_naming_the_first(tmp_path):
    with RunLock(tmp_path):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(CaiError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert not (tmp_path / LOCK).exists()  # released
    with RunLock(tmp_path):  # free again
        pass


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "started": time.time(),
                                             "heartbeat": time.time()}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_other_hosts_lock_is_kept_while_its_heartbeat_is_fresh_and_taken_when_stale(tmp_path):
    other = {"host": "node-that-is-not-here", "pid": 1, "started": time.time()}
    (tmp_path / LOCK).write_text(json.dumps({**other, "heartbeat": time.time() - STALE_AFTER / 2}))
    with pytest.raises(CaiError, match="node-that-is-not-here"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK).write_text(json.dumps({**other, "heartbeat": time.time() - STALE_AFTER - 1}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["host"] == socket.gethostname()


def test_heartbeat_moves_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr("cai.run_lock.HEARTBEAT_EVERY", 0.1)
    with RunLock(tmp_path):
        first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
