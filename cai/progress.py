"""Progress for long work: a bar on a terminal; in a log file (Slurm's stdout), a line per unit of work and a
heartbeat line after HEARTBEAT seconds without one."""
from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from cai.metrics_log import Reporter

console = Console(stderr=True)
HEARTBEAT = 30.0     # the longest a log file goes without a line
STEP_LINE_EVERY = 5.0  # step lines in a log file, at most one per this many seconds (and the last one)
STEPS = "steps.jsonl"  # a training stage's step records, written by rank 0 and followed by the driver


def log_line(text: str) -> None:
    """A line for the log file (nothing on a terminal, where the bar shows it)."""
    if not console.is_terminal:
        print(text, file=sys.stderr, flush=True)


class RowProgress:
    """A bar over rows that also shows new tokens per second; plain log lines when not a terminal."""

    def __init__(self, desc: str, total: int, done: int = 0):
        self.desc, self.total, self.done = desc, total, done
        self.tokens = 0
        self.start = time.time()
        self.resumed = done
        self.last_line = time.time()
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), console=console,
                             disable=not console.is_terminal)
        self._task = self._bar.add_task(desc, total=total, completed=done, rates="")

    def rates(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return f"{(self.done - self.resumed) / elapsed:.2f} rows/s {self.tokens / elapsed:.0f} tok/s"

    def advance(self, rows: int, new_tokens: int) -> None:
        self.done += rows
        self.tokens += new_tokens
        self._bar.update(self._task, completed=self.done, rates=self.rates())
        log_line(f"{self.desc}: {self.done}/{self.total} rows, {self.rates()}")
        self.last_line = time.time()

    def heartbeat(self, running: int) -> None:
        """Call while waiting: a line when the log has been silent for HEARTBEAT seconds."""
        if time.time() - self.last_line >= HEARTBEAT:
            log_line(f"{self.desc}: working on {running} shard(s), {self.done}/{self.total} rows committed, "
                     f"{time.time() - self.start:.0f}s")
            self.last_line = time.time()

    def __enter__(self):
        self._bar.__enter__()
        if self.resumed and not console.is_terminal:
            print(f"{self.desc}: resuming, {self.resumed}/{self.total} rows already committed", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)


class PpoLog:
    """Rank 0's record of a PPO run: metrics.jsonl (a resumed run rewrites the steps after its checkpoint),
    samples.jsonl every `sample_every` steps, the logs (`reporter`, cai/metrics_log.py), and one line per step
    (the loop runs in a Ray worker, whose output is a log, not a terminal)."""

    def __init__(self, out: Path, total: int, start: int, reporter: Reporter):
        self.out, self.total, self.reporter = out, total, reporter
        self.metrics = out / "metrics.jsonl"
        kept = [line for line in (self.metrics.read_text().splitlines() if self.metrics.exists() else [])
                if json.loads(line)["step"] <= start]
        self.metrics.write_text("".join(line + "\n" for line in kept))
        if start:
            print(f"ppo: resumed at step {start}/{total}", flush=True)

    def step(self, m: dict, prompts: list[str], texts: list[str], scores: list[float], sample_every: int) -> None:
        from cai.metrics_log import ppo_metric_names

        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(m) + "\n")
        self.reporter.log(ppo_metric_names(m), m["step"])
        if m["step"] % sample_every == 0 or m["step"] == self.total:
            with open(self.out / "samples.jsonl", "a") as fh:
                for p, t, s in list(zip(prompts, texts, scores))[:4]:
                    fh.write(json.dumps({"step": m["step"], "prompt": p, "response": t, "score": s}) + "\n")
        print(f"ppo step {m['step']}/{self.total}: reward {m['reward_mean']:+.3f} kl {m['kl']:.3f} "
              f"(β {m['kl_coef']:.4f}) entropy {m['entropy']:.2f} pl {m['policy_loss']:+.4f} "
              f"vl {m['value_loss']:.4f} clip {m['clip_frac']:.2f} len {m['response_length']:.1f} "
              f"eos {m['eos_rate']:.2f} {m['step_time']:.2f}s/step"
              + (f" WARNING: {'; '.join(m['warnings'])}" if m.get("warnings") else ""), flush=True)

    def close(self) -> None:
        self.reporter.close()


class StepLog:
    """Rank 0's step records of a training stage (one JSON line per optimizer step), for the driver to follow.
    A run resumed from the checkpoint of step `start` drops the records of the killed run's later steps."""

    def __init__(self, path: Path, start: int | None = None):
        self.path = Path(path)
        if start is not None and self.path.exists():
            kept = [line for line in self.path.read_text().split("\n")[:-1] if json.loads(line)["step"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, total: int, **metrics: float) -> None:
        record = {"step": step, "total": total,
                  **{k: float(f"{v:.6g}") for k, v in metrics.items() if isinstance(v, (int, float))}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def step_info(m: dict) -> tuple[str, list[str]]:
    """A step record as a line's text, and its warnings."""
    shown = [f"{k} {v:.4g}" for k, v in m.items() if k not in ("step", "total") and isinstance(v, (int, float))]
    return " ".join(shown), []


@contextmanager
def following(path: Path, desc: str, total: int | None = None,
              info: Callable[[dict], tuple[str, list[str]]] = step_info) -> Iterator[None]:
    """While the body runs (workers training elsewhere), show the records appended to `path`: a bar on a
    terminal, else a line per record (at most one per STEP_LINE_EVERY s) and a heartbeat when silent."""
    stop = threading.Event()
    seen = len(path.read_text().splitlines()) if path.exists() else 0  # a resumed run's earlier steps

    def follow() -> None:
        nonlocal seen
        start = last_line = time.time()
        step, shown_step = 0, 0
        with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task(desc, total=total, info="")
            while True:
                finished = stop.wait(0.5)
                lines = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines only
                for n, line in enumerate(lines[seen:], start=seen + 1):
                    m = json.loads(line)
                    step = m["step"]
                    text, warnings = info(m)
                    bar.update(task, completed=step, total=m.get("total", total), info=text)
                    for w in warnings:
                        console.print(f"[bold yellow]{desc} step {step}: WARNING: {w}[/]")
                    last_of_batch = n == len(lines)
                    if last_of_batch and (time.time() - last_line >= STEP_LINE_EVERY or step == m.get("total", total)
                                          or shown_step == 0):
                        log_line(f"{desc} step {step}/{m.get('total', total)}: {text}")
                        last_line, shown_step = time.time(), step
                seen = len(lines)
                if finished:
                    return
                if time.time() - last_line >= HEARTBEAT:
                    log_line(f"{desc}: working, {time.time() - start:.0f}s, step {step}/{total or '?'}")
                    last_line = time.time()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
