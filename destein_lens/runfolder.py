"""The resumable run folder: one writer at a time, one run per folder, lines that survive kill -9.

A run folder holds `config.json` (what the run is), one `prompted_gens_<method>.jsonl` per method
(the DExperts layout, one finished prompt per line, fsynced), `metrics.json` and the reports. A
process that writes to it holds an exclusive `flock` on `.lock` for its whole life: the kernel
drops the lock when the process dies, however it dies, so a killed run never leaves the folder
stuck, and a second writer is refused at once instead of doing the work twice.

Under a data-parallel launch (`distributed`) rank 0 holds the lock for the whole launch and every
rank appends to its own shard, `.shards/<method>.rank<r>.jsonl`; `merge` folds the shards into
the generations file, in prompt order, exactly as a single process writes it. A folder resumes
with any number of ranks: what is finished is read from the generations file and every shard.

When a method's generations file is complete, the digest of each of its lines goes to
`.finished.json`; `check_same_run` (before any model work) refuses a finished line that no longer
matches its digest, and any complete line that is not a generations row, so a damaged folder is one
line of error instead of wrong metrics. A line that is missing is simply generated again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import distributed
from .errors import DesteinError
from .files import check_out_dir, write_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
SHARDS_DIR = ".shards"
FINISHED_FILE = ".finished.json"
_HELD: dict[Path, int] = {}  # folders this process holds, with nesting depth (flock is per open file)


def gens_path(out_dir: Path, method: str) -> Path:
    return out_dir / f"prompted_gens_{method}.jsonl"


def shard_path(out_dir: Path, method: str, rank: int) -> Path:
    return out_dir / SHARDS_DIR / f"{method}.rank{rank}.jsonl"


def own_path(out_dir: Path, method: str) -> Path:
    """Where this process appends its finished prompts: the generations file, or its rank's shard."""
    if distributed.world_size() == 1:
        return gens_path(out_dir, method)
    return shard_path(out_dir, method, distributed.rank())


def finished_rows(out_dir: Path, method: str) -> dict[str, dict[str, Any]]:
    """Every finished prompt's row, by prompt id, from the generations file and all shards.

    Only this process's own file has a half-written last line cut off; the others' are read up
    to their last complete line (their writers may still be appending).
    """
    own = own_path(out_dir, method)
    paths = [gens_path(out_dir, method), *sorted((out_dir / SHARDS_DIR).glob(f"{method}.rank*.jsonl"))]
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in read_rows(path, truncate=path == own):
            rows.setdefault(row["prompt"]["id"], row)
    return rows


def merge(out_dir: Path, method: str, prompt_ids: list[str]) -> None:
    """Fold the shards into the generations file, one line per prompt in `prompt_ids` order."""
    rows = finished_rows(out_dir, method)
    missing = [i for i in prompt_ids if i not in rows]
    if missing:
        raise DesteinError(f"{out_dir}: {len(missing)} prompts of {method} unfinished (first: {missing[0]})")
    lines = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in prompt_ids)
    write_atomic(gens_path(out_dir, method), lines)
    for shard in (out_dir / SHARDS_DIR).glob(f"{method}.rank*.jsonl"):
        shard.unlink()
    finished = _finished(out_dir)
    finished[method] = {i: _digest(json.dumps(rows[i], ensure_ascii=False).encode()) for i in prompt_ids}
    write_atomic(out_dir / FINISHED_FILE, json.dumps(finished, indent=1, sort_keys=True))


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:16]


def _finished(out_dir: Path) -> dict[str, dict[str, str]]:
    """Method -> prompt id -> digest of its finished line."""
    path = out_dir / FINISHED_FILE
    if not path.exists():
        return {}
    try:
        finished = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        finished = None
    if not isinstance(finished, dict):
        raise DesteinError(f"{path} is damaged; delete it (the generations are then checked line by line)")
    return finished


def check_files(out_dir: Path) -> None:
    """Refuse damaged generations: a complete line that is not a row, or a finished line changed since."""
    finished = _finished(out_dir)
    for path in [*out_dir.glob("prompted_gens_*.jsonl"), *(out_dir / SHARDS_DIR).glob("*.jsonl")]:
        rows = read_rows(path, truncate=False)
        recorded = finished.get(path.name.removeprefix("prompted_gens_").removesuffix(".jsonl"))
        if path.parent != out_dir or not isinstance(recorded, dict):
            continue
        data = path.read_bytes()
        for n, (line, row) in enumerate(zip(data[: data.rfind(b"\n") + 1].splitlines(), rows), 1):
            if recorded.get(row["prompt"]["id"]) != _digest(line):
                raise DesteinError(
                    f"{path}:{n} changed after its run finished (damaged or edited); delete that line "
                    "to have its prompt generated again"
                )


@contextmanager
def hold(out_dir: str | Path) -> Iterator[Path]:
    """Be the folder's only writer inside the block; refuse at once if another process is.

    Under a launch, rank 0 holds the lock for all ranks, and the others start only once it does.
    """
    out_dir = check_out_dir(out_dir)
    key = out_dir.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out_dir
        finally:
            _HELD[key] -= 1
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(out_dir) if distributed.is_main() else None
    distributed.barrier()
    _HELD[key] = 1
    try:
        yield out_dir
    finally:
        del _HELD[key]
        if fd is not None:
            os.close(fd)  # releases the flock


def _lock(out_dir: Path) -> int:
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DesteinError(
            f"{out_dir} is in use by another destein-lens process (pid {owner}); "
            "wait for it to finish or use another --out folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def read_config(out_dir: Path) -> dict[str, Any] | None:
    """The folder's config.json, or None for a fresh folder."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise DesteinError(f"{path} is unreadable; use another --out folder") from None


def check_same_run(out_dir: Path, run_config: dict[str, Any], *, partial: bool = False) -> None:
    """Refuse a folder that holds another run.

    With `partial`, `run_config` holds only what is known so far (before the model is loaded,
    say): each of its fields, and each key of a nested field, must match; the rest is not compared.
    """
    existing = read_config(out_dir)
    if existing is None:
        if out_dir.exists() and any(out_dir.glob("prompted_gens_*.jsonl")):
            raise DesteinError(f"{out_dir} holds generations but no {CONFIG_FILE}; use another --out folder")
        return
    if not isinstance(existing, dict):
        raise DesteinError(f"{out_dir / CONFIG_FILE} is not a run config; use another --out folder")
    check_files(out_dir)
    wanted = json.loads(json.dumps(run_config))  # tuples -> lists, as read back
    compared = set(wanted) if partial else set(existing) | set(wanted)
    differing = sorted(k for k in compared if not _matches(existing.get(k), wanted.get(k), partial))
    if differing:
        raise DesteinError(
            f"{out_dir} holds another run (its config differs in: {', '.join(differing)}); "
            f"use another --out folder{_scorer_hint(existing, wanted)}"
        )


def _scorer_hint(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """How to add a scorer to a folder scored by another one: it stays first (`rescoring`)."""
    own, asked = (
        c.get("eval", {}).get("scorer") if isinstance(c.get("eval"), dict) else None
        for c in (existing, wanted)
    )
    if own is None or asked is None or own == asked:
        return ""
    return f", or keep its scorer first to add another: --scorer {own},{asked}"


def _matches(existing: Any, wanted: Any, partial: bool) -> bool:
    if partial and isinstance(wanted, dict):
        return isinstance(existing, dict) and all(
            _matches(existing.get(k), v, partial) for k, v in wanted.items()
        )
    return existing == wanted


def claim(out_dir: Path, run_config: dict[str, Any]) -> None:
    """Start a run folder, or resume it only if it holds this very run (rank 0 writes its config)."""
    check_same_run(out_dir, run_config)
    fresh = read_config(out_dir) is None  # read by every rank before rank 0 writes (`main_writes` waits)
    distributed.barrier()
    if fresh:
        distributed.main_writes(lambda: write_atomic(out_dir / CONFIG_FILE, json.dumps(run_config, indent=1)))


def read_rows(path: Path, *, truncate: bool) -> list[dict[str, Any]]:
    """Complete lines of a generations file; with `truncate`, cut a half-written last line off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if truncate and end < len(data):  # killed mid-write: that prompt is simply redone
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            row = None
        if not _is_row(row):
            raise DesteinError(
                f"{path}:{n}: not a generations line (the folder is damaged); delete that line to have "
                "its prompt generated again"
            )
        rows.append(row)
    return rows


def _is_row(row: Any) -> bool:
    """A prompt with its id and a list of generations (what every reader of a row relies on)."""
    return (
        isinstance(row, dict)
        and isinstance(row.get("prompt"), dict)
        and isinstance(row["prompt"].get("id"), str)
        and isinstance(row.get("generations"), list)
        and all(
            isinstance(g, dict) and {"text", "toxicity", "perplexity"} <= set(g) for g in row["generations"]
        )
    )


def append_lines(sink: Any, objs: list[dict[str, Any]]) -> None:
    """Finished prompts, on disk before the next batch starts."""
    sink.write("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objs))
    sink.flush()
    os.fsync(sink.fileno())
