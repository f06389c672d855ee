"""Prompt sets: the shipped seeds and user files (jsonl, csv, parquet, a `datasets` folder).

Bad files end with one line naming the file and the row: an empty file, not UTF-8, NUL bytes or
other control characters in the text, malformed JSON or CSV (an unterminated quote, more fields
than the header), a file that is not Parquet, a missing column, an empty prompt, or no prompts.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from pathlib import Path

from cai.config import PromptSource
from cai.errors import CaiError, bad_character

# the training seeds, and the evaluation sets (disjoint from them: tests/test_eval_sets.py)
BUILTIN = {"builtin:red_team": "prompts/red_team.jsonl", "builtin:helpful": "prompts/helpful.jsonl",
           "builtin:eval_harmful": "eval/harmful.jsonl", "builtin:eval_helpful": "eval/helpful.jsonl",
           "builtin:eval_borderline": "eval/borderline.jsonl"}


def _builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise CaiError(f"prompt source '{name}': unknown builtin (known: {', '.join(BUILTIN)})")
    return Path(__file__).parent / "data" / BUILTIN[name]


def checked_text(path: Path) -> str:
    """A text file's contents, or one line naming the file (and line) when it is not usable UTF-8 text."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CaiError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise CaiError(f"{path}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise CaiError(f"{path}: file is empty")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise CaiError(f"{path}: UTF-16 text; save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # spreadsheet exports start with one
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise CaiError(f"{path}:{line}: NUL byte (binary data, not text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CaiError(f"{path}:{line}: not UTF-8 (byte {e.start})") from None


def check_text(path: Path, n: int, row: dict, columns) -> None:
    """One line naming the file, row and column when a text value holds a control character."""
    for column in columns:
        value = row.get(column)
        problem = bad_character(value) if isinstance(value, str) else None
        if problem:
            raise CaiError(f"{path}: row {n}: column '{column}' holds {problem}")


def jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """[(line, object)] of a JSON-lines file; blank lines are skipped, anything else is one line."""
    rows = []
    # lines end at \n only: str.splitlines would also split at U+2028 and other characters JSON strings may hold
    for n, line in enumerate(checked_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaiError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CaiError(f"{path}:{n}: expected a JSON object per line")
        rows.append((n, row))
    return rows


def _jsonl_rows(path: Path, column: str) -> list[tuple[int, dict]]:
    rows = jsonl_objects(path)
    for n, row in rows:
        if column not in row:
            raise CaiError(f"{path}:{n}: no column '{column}' (keys: {', '.join(row) or 'none'})")
    return rows


def _first_line_of_record(lines: list[str], after: int) -> int:
    """The line a CSV record starts on: the first non-blank line after line `after` (the reader skips blanks)."""
    n = after + 1
    while n <= len(lines) and not lines[n - 1].strip():
        n += 1
    return n


def _csv_rows(path: Path, column: str) -> list[tuple[int, dict]]:
    text = checked_text(path)
    lines = text.split("\n")  # as the reader counts them
    # strict: an unterminated quote is an error, not a field that swallows the rest of the file
    reader = csv.DictReader(io.StringIO(text), strict=True)
    rows: list[tuple[int, dict]] = []
    done = 0  # the last line of the last record read
    try:
        header = reader.fieldnames or []
        if column not in header:
            raise CaiError(f"{path}: no column '{column}' (columns: {', '.join(header) or 'none'})")
        done = reader.line_num
        for row in reader:
            if None in row:  # DictReader's key for the fields beyond the header's
                raise CaiError(f"{path}:{_first_line_of_record(lines, done)}: "
                               f"{len(header) + len(row[None])} fields, the header has {len(header)} "
                               f"(a comma in an unquoted prompt?)")
            rows.append((reader.line_num, row))
            done = reader.line_num
    except csv.Error as e:
        raise CaiError(f"{path}:{_first_line_of_record(lines, done)}: malformed CSV in the row "
                       f"starting on this line ({e}; an unterminated or stray quote?)") from None
    return rows


def _table_rows(table, path: Path, column: str, what: str) -> list[tuple[int, dict]]:
    if column not in table.column_names:
        raise CaiError(f"{path}: no column '{column}' in {what} (columns: {', '.join(table.column_names)})")
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


def _parquet_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        first = (str(e) or type(e).__name__).splitlines()[0]
        reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", first)  # it names the path again
        raise CaiError(f"{path}: not a readable Parquet file ({reason})") from None


def _dataset_rows(path: Path, src: PromptSource) -> list[tuple[int, dict]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise CaiError(f"{path}: not a `datasets` folder ({type(e).__name__})") from None
    if isinstance(ds, DatasetDict):
        if src.split not in ds:
            raise CaiError(f"{path}: no split '{src.split}' (splits: {', '.join(ds)})")
        ds = ds[src.split]
    return _table_rows(ds.data.table, path, src.column, f"split '{src.split}'")


def read_rows(src: PromptSource, text_columns: tuple[str, ...] = ()) -> tuple[Path, list[tuple[int, dict]]]:
    """(file, [(line or row number, row)]) of any supported file; checks the encoding, the column, and that
    the column and `text_columns` hold no control characters."""
    path = _builtin_path(src.path) if src.path.startswith("builtin:") else Path(src.path)
    if not path.exists():
        raise CaiError(f"{path}: prompt file not found")
    if path.is_dir():
        rows = _dataset_rows(path, src)
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path, src.column)
    elif path.suffix == ".csv":
        rows = _csv_rows(path, src.column)
    elif path.suffix == ".parquet":
        rows = _table_rows(_parquet_table(path), path, src.column, "the parquet file")
    else:
        raise CaiError(f"{path}: unsupported prompt file type (use .jsonl, .csv, .parquet or a datasets folder)")
    if not rows:
        raise CaiError(f"{path}: no prompts in file")
    for n, row in rows:
        check_text(path, n, row, (src.column, *text_columns))
    return path, rows


def read_source(src: PromptSource) -> list[dict]:
    """-> [{id, prompt, source}] in file order; any bad row is a one-line CaiError."""
    path, rows = read_rows(src)
    out = []
    for n, row in rows:
        text = row.get(src.column)
        if not isinstance(text, str) or not text.strip():
            raise CaiError(f"{path}: row {n}: column '{src.column}' is empty or not text")
        out.append({"id": str(row.get("id") or f"{path.stem}-{n:05d}"), "prompt": text.strip(),
                    "source": src.path})
    return out


def fingerprint(src: PromptSource) -> str:
    """Content hash of a source, for cache keys (editing a prompt file reruns what reads it)."""
    path = _builtin_path(src.path) if src.path.startswith("builtin:") else Path(src.path)
    h = hashlib.sha256(f"{src.column}|{src.split}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError:  # missing or unreadable: reading the source says which, in one line
            h.update(b"missing")
    return h.hexdigest()[:16]


# -- duplicates ------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def shingles(text: str, n: int = 3) -> frozenset:
    words = normalise(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


class NearDuplicateFilter:
    """Keeps texts whose word-3-gram Jaccard similarity to every kept text is below a threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.kept: list[frozenset] = []
        self.index: dict[str, list[int]] = {}
        self.exact: set[str] = set()

    def add(self, text: str) -> bool:
        """True (and remember it) when `text` is new; False for an exact or near duplicate."""
        key = normalise(text)
        if key in self.exact:
            return False
        sh = shingles(text)
        overlap: dict[int, int] = {}
        for s in sh:
            for j in self.index.get(s, ()):
                overlap[j] = overlap.get(j, 0) + 1
        for j, common in overlap.items():
            if common / len(sh | self.kept[j]) >= self.threshold:
                return False
        self.exact.add(key)
        for s in sh:
            self.index.setdefault(s, []).append(len(self.kept))
        self.kept.append(sh)
        return True
