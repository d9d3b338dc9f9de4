"""Reading users' files and hub datasets, shared by the pair and prompt loaders.

Every failure is a one-line `DesteinError` naming the file and, where there is one, the line, so
that a user can go straight to what is wrong. Text files are read as UTF-8 with an optional byte
order mark (Windows editors write one), which would otherwise end up in the first text or break
the first JSON line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from .errors import DesteinError, reason

ENCODING = "utf-8-sig"  # UTF-8; a leading byte order mark is dropped


@contextmanager
def open_text(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open a user's text file; a missing file or bytes that are not UTF-8 become one clear line.

    Undecodable bytes surface while the body reads, so the body must read inside the `with`.
    """
    path = Path(path)
    if not path.is_file():
        raise DesteinError(f"file not found: {path}")
    try:
        with path.open(encoding=ENCODING, newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        raise DesteinError(f"{path}: not UTF-8 text") from None


def source_file(spec: str | Path, what: str, suffixes: tuple[str, ...], others: str) -> tuple[Path, str]:
    """The file a loader's `spec` names, with its lower-case suffix; a missing file or an unknown
    kind is refused before any reading, naming the `others` the loader takes instead of a file."""
    path = Path(spec)
    if not path.is_file():
        raise DesteinError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise DesteinError(f"unsupported {what} file {path}: expected {' or '.join(suffixes)}, {others}")
    return path, suffix


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (`file:line`, object) for each non-blank line; bad JSON or a non-object names its line."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DesteinError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DesteinError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def load_hf_dataset(dataset_id: str, split: str, hint: str) -> Any:
    """`datasets.load_dataset`, with any failure (offline, unknown id, bad split) as one DesteinError line."""
    try:
        import datasets  # imported here: slow to import and only needed for hub sources

        return datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise DesteinError(
            f"cannot load hf:{dataset_id} (split {split}) from the Hugging Face hub, "
            f"which may be unreachable ({reason(e)}); {hint}"
        ) from e


def check_count(n: int, what: str) -> None:
    """Reject non-positive limits early, as a user error rather than a silently empty result."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DesteinError(f"{what} must be a positive integer, got {n!r}")


def text_field(value: Any, where: str, field: str) -> str:
    """`value` if it is a non-blank string: an absent or empty text would silently shift or skip data."""
    if not isinstance(value, str):
        raise DesteinError(f"{where}: missing or non-string {field!r} field")
    if not value.strip():
        raise DesteinError(f"{where}: empty {field!r} text")
    return value


def fold_whitespace(text: str) -> str:
    """One line with single spaces, so line breaks and doubled spaces never make two texts differ."""
    return " ".join(text.split())
