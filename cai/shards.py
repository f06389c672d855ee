"""Sharded JSONL outputs, each shard committed atomically (write a temp file, fsync, rename).

A shard file exists only when complete, so a killed run resumes by skipping the shards it finds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def write_atomic(path: Path, text: str) -> None:
    """Write `text` so that `path` is either absent or complete, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def chunk(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class ShardStore:
    """A folder of `shard-NNNNN.jsonl` files for one list of inputs cut into fixed shards."""

    def __init__(self, folder: Path, total: int):
        self.folder = Path(folder)
        self.total = total

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.jsonl"

    def committed(self) -> set[int]:
        if not self.folder.exists():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.jsonl")}

    def commit(self, index: int, rows: list[dict]) -> None:
        write_jsonl(self.path(index), rows)

    def complete(self) -> bool:
        return len(self.committed()) == self.total

    def rows(self) -> list[dict]:
        """All rows in shard order (only call once complete)."""
        return [row for i in range(self.total) for row in read_jsonl(self.path(i))]
