"""YAML files validated by pydantic, with errors that point at the file and line.

We compose the YAML node tree once, so every value keeps its line number; a pydantic error's
`loc` path is then mapped back to the line of the offending key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cai.errors import CaiError, where

M = TypeVar("M", bound=BaseModel)


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`; people write 1e-5)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_value(text: str):
    """One YAML value (used for command-line overrides)."""
    return yaml.load(text, Loader=Loader)


def _to_python(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: Path) -> Any:
    """Turn a composed node into plain Python, recording the line of every path (1-based)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise CaiError(f"{where(file, key_node.start_mark.line + 1)}: duplicate key '{key}'")
            out[key] = _to_python(value_node, path + (key,), lines, file)
            lines[path + (key,)] = key_node.start_mark.line + 1  # the key's line, not its value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path + (i,), lines, file) for i, v in enumerate(node.value)]
    loader = Loader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def read_yaml(file: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file into (data, {path: line}). Raises CaiError on unreadable or malformed files."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError(f"{file}: file not found") from None
    except IsADirectoryError:
        raise CaiError(f"{file}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise CaiError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CaiError(f"{file}: cannot read ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: no mark, a position
            line = text[:e.position].count("\n") + 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CaiError(f"{where(file, line)}: malformed YAML: {problem}") from None
    if node is None:
        raise CaiError(f"{file}: file is empty")
    lines: dict[tuple, int] = {}
    return _to_python(node, (), lines, file), lines


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the deepest known prefix of `loc`."""
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


def describe_validation_error(err: ValidationError, file: Path, lines: dict[tuple, int]) -> str:
    """First pydantic error as one line: `file:line: key 'a.b': message`."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or None
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "missing required key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where(file, line_of(lines, loc), key)}: {msg}{extra}"


def validate_yaml(model: type[M], data: Any, file: Path, lines: dict[tuple, int]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise CaiError(describe_validation_error(e, file, lines)) from None


def load_yaml_model(model: type[M], file: Path) -> M:
    data, lines = read_yaml(file)
    return validate_yaml(model, data, Path(file), lines)
