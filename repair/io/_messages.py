"""One-line, file-naming error messages shared by every reader and writer in :mod:`repair.io`.

Error text from files or libraries may hold newlines or control characters; the CLI promises
one line per failure that names the file, so every error is built here.
"""

from __future__ import annotations

from pathlib import Path

from repair.errors import MergetuneError

_MESSAGE_LIMIT = 300


def _one_line(text: str) -> str:
    """Error text from files or libraries may hold newlines; we promise one line."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= _MESSAGE_LIMIT else clean[: _MESSAGE_LIMIT - 3] + "..."


def _fail(cls: type[MergetuneError], path: Path | str, text: str) -> MergetuneError:
    """Build the one-line, file-naming error every caller expects."""
    return cls(_one_line(f"{path}: {text}"))


def _describe_exception(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {detail[0]}" if detail else "")
