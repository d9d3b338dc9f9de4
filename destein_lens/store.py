"""Saved results: tensors in `<stem>.safetensors`, everything else in the JSON sidecar `<stem>.json`.

Every result the workbench keeps on disk (vector files, attribution results) goes through these two
functions, so each one says what it is (`kind`), the format version and package version that wrote
it, and the sha256 of its tensors and of its own metadata. A truncated, damaged, edited or swapped
file is refused with one line instead of loading wrong numbers; nothing is ever unpickled.
Sidecars written before this helper (no `kind`) still load, unchecked.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import DesteinError, reason
from .files import write_atomic

_RESERVED = ("kind", "format_version", "package_version", "tensors_sha256", "meta_sha256")


def paths(stem: str | Path) -> tuple[Path, Path]:
    """(`<stem>.safetensors`, `<stem>.json`); a path ending in either suffix names the same pair."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def package_version() -> str:
    try:
        return metadata.version("destein-lens")
    except metadata.PackageNotFoundError:
        return "unknown"


def _digest(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def save_result(
    stem: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, version: int = 1
) -> Path:
    """Write the pair atomically, tensors first; returns the safetensors path."""
    tensors_path, meta_path = paths(stem)
    clash = set(meta) & set(_RESERVED)
    if clash:
        raise ValueError(f"metadata keys reserved by the store: {sorted(clash)}")
    blob = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    write_atomic(tensors_path, blob)
    header = {
        "kind": kind,
        "format_version": version,
        "package_version": package_version(),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "meta_sha256": _digest(meta),
    }
    write_atomic(meta_path, json.dumps({**header, **meta}, indent=1, ensure_ascii=False))
    return tensors_path


def load_result(
    stem: str | Path, kind: str, *, versions: tuple[int, ...] = (1,)
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved pair, checked against its own record; one-line errors."""
    tensors_path, meta_path = paths(stem)
    try:
        blob = tensors_path.read_bytes()
        sidecar = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DesteinError(f"{kind} file not found: {e.filename}") from None
    except (OSError, ValueError) as e:
        raise DesteinError(f"{meta_path} is not a readable {kind} file ({reason(e)})") from None
    if not isinstance(sidecar, dict):
        raise DesteinError(f"{meta_path} is not a {kind} file (its JSON is not an object)")
    if "kind" in sidecar:
        _check(sidecar, blob, kind, versions, meta_path, tensors_path)
    meta = {k: v for k, v in sidecar.items() if k not in _RESERVED}
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, OSError) as e:
        raise DesteinError(f"{tensors_path} is not a valid safetensors file ({reason(e)})") from None
    return meta, tensors


def _check(
    sidecar: dict[str, Any],
    blob: bytes,
    kind: str,
    versions: tuple[int, ...],
    meta_path: Path,
    tensors_path: Path,
) -> None:
    if sidecar["kind"] != kind:
        raise DesteinError(f"{meta_path} holds a {sidecar['kind']!r} result, not a {kind} file")
    if sidecar.get("format_version") not in versions:
        raise DesteinError(
            f"{meta_path}: {kind} format version {sidecar.get('format_version')!r} is not one this "
            f"destein-lens reads ({', '.join(map(str, versions))}); rebuild it"
        )
    if sidecar.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
        raise DesteinError(
            f"{tensors_path} does not match the digest its sidecar recorded (damaged, truncated or "
            "replaced); rebuild it"
        )
    meta = {k: v for k, v in sidecar.items() if k not in _RESERVED}
    if sidecar.get("meta_sha256") != _digest(meta):
        raise DesteinError(f"{meta_path} was edited or damaged after it was written; rebuild it")
