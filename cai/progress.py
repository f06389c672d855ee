"""Progress bars for long work: counts, rows/s and generated tokens/s."""
from __future__ import annotations

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


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def ppo_step_lines(total: int, start: int):
    """One line per step: the training loop runs in a Ray worker, whose output is a log, not a terminal."""
    def show(m: dict) -> None:
        print(f"ppo step {m['step']}/{total}: reward {m['reward_mean']:+.3f} kl {m['kl']:.3f} "
              f"(β {m['kl_coef']:.4f}) entropy {m['entropy']:.2f} pl {m['policy_loss']:+.4f} "
              f"vl {m['value_loss']:.4f} clip {m['clip_frac']:.2f} len {m['response_length']:.1f} "
              f"eos {m['eos_rate']:.2f} {m['step_time']:.2f}s/step"
              + (f" WARNING: {'; '.join(m['warnings'])}" if m.get("warnings") else ""), flush=True)
    if start:
        print(f"ppo: resumed at step {start}/{total}", flush=True)
    return show
