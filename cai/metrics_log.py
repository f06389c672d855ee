"""Training logs for TensorBoard, W&B and trackio: one reporter per training stage, on rank 0, called where the
stage writes its step records (steps.jsonl; ppo's metrics.jsonl).

Metric names follow the HF Trainer's own TensorBoard and W&B callbacks, so that sft and dpo (HF/trl trainers)
and our loops (reward_model, ppo) chart alike: a step's figures are `train/<key>`, held-out figures
`eval/<key>`, at the optimizer step they describe. Each stage writes TensorBoard event files to
<output_dir>/<stage>/logs/ and is its own W&B / trackio run, `<name>-<stage>` in group `<name>`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cai.errors import CaiError

if TYPE_CHECKING:
    from cai.config import PipelineConfig

REPORT_TO = ("tensorboard", "wandb", "trackio", "none")
PIP_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
LOGS = "logs"  # <output_dir>/<stage>/logs/
# ppo's metrics.jsonl keys that have an HF Trainer / trl name; the others keep theirs under train/
PPO_RENAMED = {"policy_loss": "loss", "lr": "learning_rate", "reward_mean": "reward"}


def metric_names(logs: dict[str, Any]) -> dict[str, float]:
    """A log record -> the names the HF Trainer gives it (transformers' `rewrite_logs`): `eval_x` -> `eval/x`,
    every other key -> `train/x`. Numbers only (a bool, a list or None is not a scalar)."""
    out = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def ppo_metric_names(m: dict[str, Any]) -> dict[str, float]:
    """A ppo metrics.jsonl record -> metric names: the policy's loss is `train/loss` and its rate
    `train/learning_rate` (the HF Trainer's names), the mean score `train/reward` (trl's); the step is the x axis."""
    return metric_names({PPO_RENAMED.get(k, k): v for k, v in m.items() if k != "step"})


@dataclass(frozen=True)
class Reporting:
    """Where one training stage reports; built in the driver, it crosses into the Ray Train workers."""
    report_to: tuple[str, ...]  # of REPORT_TO; () or ("none",): no reporting
    log_dir: Path               # TensorBoard event files (and W&B's local files)
    project: str                # W&B / trackio project
    run: str                    # the pipeline run's name: the W&B / trackio group
    stage: str
    settings: str = "{}"        # the stage's settings as JSON, the W&B / trackio run config

    @classmethod
    def of(cls, cfg: PipelineConfig, stage: str, out: Path, settings: dict | None = None) -> Reporting:
        check_installed(cfg.report_to)
        return cls(report_to=tuple(cfg.report_to), log_dir=Path(out) / LOGS, project=cfg.report_project,
                   run=cfg.name, stage=stage, settings=json.dumps(settings or {}, sort_keys=True))

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(d for d in self.report_to if d != "none")

    @property
    def run_name(self) -> str:
        return f"{self.run}-{self.stage}"


def _missing(name: str) -> CaiError:
    return CaiError(f"report_to: {name} is not installed; pip install {PIP_PACKAGE[name]} (or leave it out of "
                    f"report_to)")


def check_installed(report_to) -> None:
    """One line naming the pip package when a destination's package is missing (the driver checks before any
    work; the import itself happens on rank 0)."""
    for name in report_to:
        if name != "none" and sys.modules.get(name) is None and importlib.util.find_spec(name) is None:
            raise _missing(name)


class Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in `folder`. `first_step`: events of an earlier attempt at this step and after (a killed run's
    steps past the checkpoint resumed from) are hidden, as TensorBoard's `purge_step` does."""

    def __init__(self, writer_cls, folder: Path, first_step: int):
        self.writer = writer_cls(str(folder), purge_step=first_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a step takes seconds: the logs are current when read live

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run per stage attempt (wandb.init / run.log(step=) / run.finish)."""

    def __init__(self, wandb, r: Reporting):
        r.log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=r.project, name=r.run_name, group=r.run, job_type=r.stage, dir=str(r.log_dir),
                              config=json.loads(r.settings))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioSink:
    """A trackio run per stage attempt (trackio.init / trackio.log(step=) / trackio.finish)."""

    def __init__(self, trackio, r: Reporting):
        self.trackio = trackio
        trackio.init(project=r.project, name=r.run_name, group=r.run, config=json.loads(r.settings))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _import(name: str):
    """The module (for TensorBoard, torch's SummaryWriter) behind a destination; one line when missing."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            return SummaryWriter
        return importlib.import_module(name)
    except ImportError:
        raise _missing(name) from None


class Reporter:
    """Rank 0's metrics writer for one training stage. The destinations are imported when it is built (a missing
    package fails before training) and opened at the first `log`, whose step is where a resumed run continues."""

    def __init__(self, reporting: Reporting):
        self.reporting = reporting
        self.modules = {name: _import(name) for name in reporting.destinations}
        self.sinks: list[Sink] | None = None

    def _open(self, first_step: int) -> list[Sink]:
        r, sinks = self.reporting, []
        for name, module in self.modules.items():
            if name == "tensorboard":
                sinks.append(TensorBoardSink(module, r.log_dir, first_step))
            elif name == "wandb":
                sinks.append(WandbSink(module, r))
            else:
                sinks.append(TrackioSink(module, r))
        return sinks

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not scalars:
            return
        if self.sinks is None:
            self.sinks = self._open(step)
        for sink in self.sinks:
            sink.log(scalars, step)

    def close(self) -> None:
        for sink in self.sinks or []:
            sink.close()
        self.sinks = []

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
