"""Output files: written atomically (a reader never sees half a file), their paths checked before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import DesteinError


def cache_root() -> Path:
    """Where dequantised models, fetched model files and other caches live; `DESTEIN_LENS_CACHE` overrides."""
    return Path(os.environ.get("DESTEIN_LENS_CACHE", Path.home() / ".cache" / "destein-lens"))


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` to `path` through a temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other readers
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DesteinError(f"{what} {path} is inside {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DesteinError(f"{what} {path} cannot be created: {parent} is not writable")


def check_out_dir(path: str | os.PathLike[str]) -> Path:
    """An output folder that exists and is writable, or can be created: checked before any work."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise DesteinError(f"output folder {path} is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DesteinError(f"output folder {path} is not writable")
    else:
        _check_writable_parent(path, "output folder")
    return path


def check_out_file(path: str | os.PathLike[str]) -> Path:
    """An output file that can be (over)written: checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise DesteinError(f"output file {path} is a folder")
    _check_writable_parent(path, "output file")
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise DesteinError(f"output file {path} cannot be replaced: {path.parent} is not writable")
    return path
