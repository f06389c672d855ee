"""Training logs (cai/metrics_log.py): the metric names, the reporter (real TensorBoard event files; W&B and trackio
as fake modules that record their calls), the config and its errors, and the event files that the tiny pipeline's
sft, reward_model and ppo stages wrote, and a short dpo run's."""
from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

from cai.config import load_pipeline
from cai.errors import CaiError
from cai.metrics_log import Reporter, Reporting, check_installed, metric_names, ppo_metric_names
from cai.shards import read_jsonl, write_jsonl

from .conftest import REPO, cai, error_line


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files in `folder`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def reporting(tmp_path: Path, *report_to: str) -> Reporting:
    return Reporting(report_to=report_to, log_dir=tmp_path / "sft" / "logs", project="cai", run="tiny", stage="sft",
                     settings=json.dumps({"sft": {"lr": 0.1}}))


def fake_wandb(calls: list) -> types.ModuleType:
    """wandb's documented surface: wandb.init(...) -> a run with run.log(data, step=) and run.finish()."""
    run = types.SimpleNamespace(log=lambda data, step: calls.append(("log", dict(data), step)),
                                finish=lambda: calls.append(("finish",)))
    module = types.ModuleType("wandb")
    module.init = lambda **kw: calls.append(("init", kw)) or run
    return module


def fake_trackio(calls: list) -> types.ModuleType:
    """trackio's documented surface: trackio.init(...), trackio.log(metrics, step=), trackio.finish()."""
    module = types.ModuleType("trackio")
    module.init = lambda **kw: calls.append(("init", kw))
    module.log = lambda metrics, step: calls.append(("log", dict(metrics), step))
    module.finish = lambda: calls.append(("finish",))
    return module


# --- names -------------------------------------------------------------------------------------------------------

def test_names_are_the_hf_trainers():
    logs = {"loss": 2.5, "learning_rate": 1e-3, "grad_norm": None, "epoch": 0.5, "eval_ece": 0.1,
            "rewards/chosen": -1, "warnings": ["x"], "flag": True}
    assert metric_names(logs) == {"train/loss": 2.5, "train/learning_rate": 1e-3, "train/epoch": 0.5,
                                  "eval/ece": 0.1, "train/rewards/chosen": -1.0}


def test_ppo_names_map_onto_the_hf_trainers():
    record = {"step": 3, "reward_mean": 0.4, "policy_loss": -0.02, "lr": 1e-6, "value_loss": 0.3, "kl": 0.01,
              "kl_coef": 0.05, "grad_norm": 1.5, "epoch": 0.75, "skipped_steps": 0, "warnings": []}
    names = ppo_metric_names(record)
    assert names == {"train/reward": 0.4, "train/loss": -0.02, "train/learning_rate": 1e-6, "train/value_loss": 0.3,
                     "train/kl": 0.01, "train/kl_coef": 0.05, "train/grad_norm": 1.5, "train/epoch": 0.75,
                     "train/skipped_steps": 0.0}


def test_reward_model_batch_accuracy_and_margin():
    import torch

    from cai.stages.reward_model import pair_figures

    # margins 1, -1, 0: the first pair agrees with its label, the second not, the third is a tie (left out)
    figures = pair_figures(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.9, 0.8, 0.7]))
    assert figures == {"accuracy": 0.5, "margin": 0.0}


# --- the reporter -------------------------------------------------------------------------------------------------

def test_reporter_writes_every_destination(tmp_path, monkeypatch):
    wandb_calls, trackio_calls = [], []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(trackio_calls))
    r = reporting(tmp_path, "tensorboard", "wandb", "trackio")
    check_installed(r.report_to)
    with Reporter(r) as reporter:
        for step in (1, 2, 3):
            reporter.log({"train/loss": 1.0 / step, "train/epoch": step / 3}, step)
    init = {"project": "cai", "name": "tiny-sft", "group": "tiny", "config": {"sft": {"lr": 0.1}}}
    assert wandb_calls[0] == ("init", {**init, "job_type": "sft", "dir": str(r.log_dir)})
    assert trackio_calls[0] == ("init", init)
    for calls in (wandb_calls, trackio_calls):
        assert calls[1:] == [("log", {"train/loss": 1.0 / s, "train/epoch": s / 3}, s) for s in (1, 2, 3)] + [
            ("finish",)]
    scalars = events(r.log_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])


def test_a_resumed_run_hides_the_killed_attempts_later_steps(tmp_path):
    r = reporting(tmp_path, "tensorboard")
    with Reporter(r) as killed:  # logged steps 1-5, checkpointed at 3
        for step in range(1, 6):
            killed.log({"train/loss": float(step)}, step)
    with Reporter(r) as resumed:
        for step in range(4, 7):
            resumed.log({"train/loss": 10.0 * step}, step)
    assert events(r.log_dir)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_none_reports_nowhere(tmp_path):
    with Reporter(reporting(tmp_path, "none")) as reporter:
        reporter.log({"train/loss": 1.0}, 1)
    assert not (tmp_path / "sft" / "logs").exists()


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("trackio", "trackio"),
                                          ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_is_one_line_naming_it(name, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(CaiError, match=f"^report_to: {name} is not installed; pip install {name} "):
        Reporter(reporting(tmp_path, name))
    if name != "tensorboard":
        with pytest.raises(CaiError, match=f"pip install {name} "):
            check_installed([name])


# --- config -------------------------------------------------------------------------------------------------------

def test_report_to_config():
    tiny = REPO / "pipelines/tiny.yaml"
    assert load_pipeline(tiny).report_to == ["tensorboard"]
    assert load_pipeline(tiny, ["report_to=wandb"]).report_to == ["wandb"]  # one value, as the HF Trainer takes
    assert load_pipeline(tiny, ["report_to=[tensorboard,trackio]"]).report_to == ["tensorboard", "trackio"]
    with pytest.raises(CaiError, match="key 'report_to.0': Input should be 'tensorboard', 'wandb', 'trackio' or"):
        load_pipeline(tiny, ["report_to=wand"])
    with pytest.raises(CaiError, match="key 'report_to': Value error, 'none' cannot be combined"):
        load_pipeline(tiny, ["report_to=[none,wandb]"])


def test_run_with_a_missing_package_stops_before_any_work(tiny_model, tmp_path, monkeypatch):
    if "wandb" in sys.modules or __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    proc = cai("run", "pipelines/tiny.yaml", f"policy.name={tiny_model}", f"output_dir={out}", "report_to=wandb",
               check=False)
    assert error_line(proc) == "cai: error: report_to: wandb is not installed; pip install wandb (or leave it out " \
                               "of report_to)"
    assert not out.exists()


# --- real runs ----------------------------------------------------------------------------------------------------

def finite_steps(scalars: dict, tag: str) -> list[int]:
    assert all(math.isfinite(v) for _, v in scalars[tag]), (tag, scalars[tag])
    return [s for s, _ in scalars[tag]]


@pytest.mark.slow
def test_the_tiny_pipelines_training_stages_log_alike(tiny_run):
    out = tiny_run[0]
    summary = {s: json.loads((out / s / "_COMPLETE.json").read_text())["summary"] for s in ("sft", "reward_model")}
    steps = {"sft": summary["sft"]["steps"], "reward_model": summary["reward_model"]["steps"], "ppo": 4}
    for stage, n in steps.items():
        scalars = events(out / stage / "logs")
        for tag in ("train/loss", "train/learning_rate", "train/grad_norm"):
            assert finite_steps(scalars, tag) == list(range(1, n + 1)), (stage, tag)
        assert sorted(set(finite_steps(scalars, "train/epoch"))) == list(range(1, n + 1))  # HF's summary repeats it
        epochs = [v for _, v in scalars["train/epoch"]]
        assert epochs == sorted(epochs) and 0 < epochs[-1] <= 1.01 * n, (stage, epochs)
        assert all(v > 0 for _, v in scalars["train/grad_norm"])
    rm = events(out / "reward_model" / "logs")
    assert finite_steps(rm, "train/accuracy") and finite_steps(rm, "train/margin")
    n = steps["reward_model"]
    assert rm["eval/accuracy"] == [(n, pytest.approx(summary["reward_model"]["eval_agreement"], abs=1e-3))]
    assert rm["eval/ece"] == [(n, pytest.approx(summary["reward_model"]["eval_ece"], abs=1e-3))]
    assert events(out / "sft" / "logs")["train/epoch"][-1][1] == pytest.approx(1.0, abs=0.01)  # sft.train.epochs
    ppo = events(out / "ppo" / "logs")
    metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/reward", "reward_mean"), ("train/kl", "kl"), ("train/loss", "policy_loss"),
                     ("train/learning_rate", "lr")):
        assert [v for _, v in ppo[tag]] == pytest.approx([m[key] for m in metrics], rel=1e-5), tag
    assert not (out / "ppo" / "tensorboard").exists()


FAKE_WANDB = '''"""A stand-in for wandb in a test: records its calls, one JSON line each, in $FAKE_WANDB_CALLS."""
import json
import os
import types


def _record(*call):
    with open(os.environ["FAKE_WANDB_CALLS"], "a") as fh:
        fh.write(json.dumps(call) + "\\n")


def init(**kw):
    _record("init", kw)
    return types.SimpleNamespace(log=lambda data, step: _record("log", data, step), finish=lambda: _record("finish"))
'''


@pytest.mark.slow
def test_dpo_logs_to_tensorboard_and_wandb(tiny_model, tiny_upstream, tmp_path):
    """A short dpo run on a copy of the upstream run, at ZeRO-0 in fp32 (where DeepSpeed itself keeps no gradient
    norm), reporting to TensorBoard and to a fake wandb package that the Ray workers import."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out)
    prefs = out / "preferences" / "preferences.jsonl"  # the tiny model's responses end at the token limit
    write_jsonl(prefs, [{**r, "chosen_finished": True, "rejected_finished": True} for r in read_jsonl(prefs)])
    (tmp_path / "fakes" / "wandb").mkdir(parents=True)
    (tmp_path / "fakes" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    calls_file = tmp_path / "wandb_calls.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fakes"), str(REPO)]),
           "FAKE_WANDB_CALLS": str(calls_file)}
    env.pop("CAI_RAY_ADDRESS", None)
    cai("run", "pipelines/tiny.yaml", f"policy.name={tiny_model}", f"output_dir={out}", "policy_optimization=dpo",
        "dpo.train.zero_stage=0", "dpo.train.max_steps=3", "report_to=[tensorboard,wandb]", "--stages", "dpo", env=env)
    scalars = events(out / "dpo" / "logs")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/rewards/accuracies"):
        assert finite_steps(scalars, tag) == [1, 2, 3], tag
    assert all(v > 0 for _, v in scalars["train/grad_norm"])  # kept at ZeRO-0 (cai.train.deepspeed.keep_grad_norm)
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert calls[0][0] == "init" and calls[0][1]["name"] == "tiny-dpo" and calls[0][1]["group"] == "tiny"
    assert calls[0][1]["config"]["dpo"]["beta"] == 0.1 and calls[-1] == ["finish"]
    logged = {(name, step): value for _, data, step in calls[1:-1] for name, value in data.items()}
    assert [logged[("train/loss", s)] for s in (1, 2, 3)] == pytest.approx([v for _, v in scalars["train/loss"]])
