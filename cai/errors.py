"""One error type for bad input: the CLI prints its message as a single line and exits 2."""
from __future__ import annotations

import re

# C0 controls but tab and newlines, DEL, C1 controls, lone UTF-16 surrogates (a JSON "\ud800" escape): text
# no tokenizer should see; they come from binary data or a broken export
BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


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


def bad_character(text: str) -> str | None:
    """`a control character (U+0000) at character 3` for the first character text must not hold; else None."""
    found = BAD_CHARACTER.search(text)
    if found is None:
        return None
    code = ord(found.group())
    what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return f"{what} (U+{code:04X}) at character {found.start() + 1}"
