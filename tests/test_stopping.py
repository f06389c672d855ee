"""Stop requests: a signal becomes the stop file and the driver's event; progress lines in a log file."""
import json
import os
import signal
import time

import pytest

from cai import progress, stopping


def test_usr1_requests_a_stop_that_workers_see_through_the_file(tmp_path):
    stop_file = tmp_path / "_STOP"
    stop_file.write_text("left by a preempted run")
    with stopping.StopOnSignal(stop_file):
        assert not stop_file.exists() and not stopping.requested()  # a resumed run starts clean
        assert os.environ[stopping.STOP_FILE_ENV] == str(stop_file)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stopping.requested() and stop_file.read_text() == "got SIGUSR1"
        assert stopping.agreed("cpu")  # no process group: this process's answer
        with pytest.raises(stopping.Stopped, match=r"before stage sft.*after 'got SIGUSR1'"):
            stopping.check("before stage sft")
        assert stopping.seconds_since_signal() >= 0
    assert not stop_file.exists() and stopping.STOP_FILE_ENV not in os.environ
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_a_worker_process_sees_only_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(stopping.STOP_FILE_ENV, str(tmp_path / "_STOP"))
    assert not stopping.requested()
    (tmp_path / "_STOP").write_text("got SIGTERM")
    assert stopping.requested()


def test_following_prints_step_lines_and_a_heartbeat_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT", 0.6)
    monkeypatch.setattr(progress, "STEP_LINE_EVERY", 0.0)
    steps = tmp_path / progress.STEPS
    progress.StepLog(steps).write(1, 3, loss=2.5)  # an earlier run's step: not shown again
    with progress.following(steps, "sft"):
        time.sleep(1.6)  # silent: heartbeats
        progress.StepLog(steps).write(2, 3, loss=1.25, learning_rate=1e-3)
        with open(steps, "a") as fh:
            fh.write(json.dumps({"step": 3, "total": 3})[:5])  # a line being written: not read yet
        time.sleep(0.8)
    err = capsys.readouterr().err
    assert "sft step 2/3: loss 1.25 learning_rate 0.001" in err
    assert "step 1/3" not in err and "step 3/3" not in err
    assert err.count("sft: working") >= 1


def test_a_resumed_step_log_drops_the_killed_runs_later_steps(tmp_path):
    steps = tmp_path / progress.STEPS
    for k in range(1, 6):
        progress.StepLog(steps).write(k, 5, loss=1.0)
    progress.StepLog(steps, start=3).write(4, 5, loss=0.5)
    assert [json.loads(line)["step"] for line in steps.read_text().splitlines()] == [1, 2, 3, 4]
