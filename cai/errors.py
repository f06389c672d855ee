"""One error type for bad input: the CLI prints its message as a single line and exits 2."""
from __future__ import annotations


class CaiError(Exception):
    """User-facing error. The message names the file, key or row and what is wrong, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def where(path: object, line: int | None = None, key: str | None = None) -> str:
    """Format a location prefix like `pipelines/x.yaml:12: key 'a.b'`."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if key:
        loc += f": key '{key}'"
    return loc
