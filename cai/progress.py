"""Progress bars for long work: counts, rows/s and generated tokens/s."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class RowProgress:
    """A bar over rows that also shows new tokens per second; plain log lines when not a terminal."""

    def __init__(self, desc: str, total: int, done: int = 0):
        self.desc, self.total, self.done = desc, total, done
        self.tokens = 0
        self.start = time.time()
        self.resumed = done
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
        if not console.is_terminal:
            print(f"{self.desc}: {self.done}/{self.total} rows, {self.rates()}", file=sys.stderr, flush=True)

    def __enter__(self):
        self._bar.__enter__()
        if self.resumed and not console.is_terminal:
            print(f"{self.desc}: resuming, {self.resumed}/{self.total} rows already committed", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)


class PpoLog:
    """Rank 0's record of a PPO run: metrics.jsonl (a resumed run rewrites the steps after its checkpoint),
    samples.jsonl every `sample_every` steps, TensorBoard when installed, and one line per step (the loop
    runs in a Ray worker, whose output is a log, not a terminal)."""

    def __init__(self, out: Path, total: int, start: int):
        self.out, self.total = out, total
        self.metrics = out / "metrics.jsonl"
        kept = [line for line in (self.metrics.read_text().splitlines() if self.metrics.exists() else [])
                if json.loads(line)["step"] <= start]
        self.metrics.write_text("".join(line + "\n" for line in kept))
        self.writer = tensorboard_writer(out / "tensorboard")
        if start:
            print(f"ppo: resumed at step {start}/{total}", flush=True)

    def step(self, m: dict, prompts: list[str], texts: list[str], scores: list[float], sample_every: int) -> None:
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(m) + "\n")
        if self.writer:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"ppo/{k}", v, m["step"])
        if m["step"] % sample_every == 0 or m["step"] == self.total:
            with open(self.out / "samples.jsonl", "a") as fh:
                for p, t, s in list(zip(prompts, texts, scores))[:4]:
                    fh.write(json.dumps({"step": m["step"], "prompt": p, "response": t, "score": s}) + "\n")
        print(f"ppo step {m['step']}/{self.total}: reward {m['reward_mean']:+.3f} kl {m['kl']:.3f} "
              f"(β {m['kl_coef']:.4f}) entropy {m['entropy']:.2f} pl {m['policy_loss']:+.4f} "
              f"vl {m['value_loss']:.4f} clip {m['clip_frac']:.2f} len {m['response_length']:.1f} "
              f"eos {m['eos_rate']:.2f} {m['step_time']:.2f}s/step"
              + (f" WARNING: {'; '.join(m['warnings'])}" if m.get("warnings") else ""), flush=True)


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
