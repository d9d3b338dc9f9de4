"""More scorers over a run folder's stored continuations, without generating again.

A run folder's generations carry its own scorer's toxicity (the folder's identity: `EvalConfig.scorer`).
Any other scorer scores the stored texts and keeps the result beside them, one file per scorer
and cell (`scores/<scorer>/<cell>.json`, keyed by the digest of the texts it scored): adding a
scorer to a finished folder costs only the scoring, and a later run reuses the file unless the
texts changed. Every conclusion can then be read under each scorer from the same generations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DesteinError
from .files import write_atomic
from .metrics import toxicity_summary
from .scoring import Scorer

SCORES_DIR = "scores"


def scores_path(out_dir: Path, scorer: str, cell: str) -> Path:
    return out_dir / SCORES_DIR / scorer / f"{cell}.json"


def rescored(
    out_dir: Path, cell: str, rows: Sequence[dict[str, Any]], scorer: Scorer
) -> dict[str, list[float]]:
    """prompt id -> the scores of its samples under `scorer`, read from the cell's file when it
    scored these very texts, else scored now and written."""
    texts = {row["prompt"]["id"]: [g["text"] for g in row["generations"]] for row in rows}
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    path = scores_path(out_dir, scorer.name, cell)
    stored = _read(path)
    if stored.get("texts_sha256") == digest:
        return stored["scores"]
    flat = scorer.score([t for samples in texts.values() for t in samples])
    scores, start = {}, 0
    for pid, samples in texts.items():
        scores[pid] = [float(x) for x in flat[start : start + len(samples)]]
        start += len(samples)
    write_atomic(path, json.dumps({"scorer": scorer.name, "texts_sha256": digest, "scores": scores}))
    return scores


def _read(path: Path) -> dict[str, Any]:
    """A scores file's content; a missing or damaged one is empty (it is scored again)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) and isinstance(stored.get("scores"), dict) else {}


def with_scores(rows: Sequence[dict[str, Any]], scores: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The rows with each generation's toxicity replaced by another scorer's (for metrics and
    paired tables computed exactly as under the folder's own scorer)."""
    out = []
    for row in rows:
        values = scores[row["prompt"]["id"]]
        if len(values) != len(row["generations"]):
            raise DesteinError(f"scores for prompt {row['prompt']['id']} do not match its generations")
        gens = [{**g, "toxicity": v} for g, v in zip(row["generations"], values)]
        out.append({**row, "generations": gens})
    return out


def by_scorer(rows: Sequence[dict[str, Any]], scored: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per scorer name, EMT and TP with intervals of these rows (`scored`: name -> `rescored`)."""
    return {
        name: toxicity_summary([scores[row["prompt"]["id"]] for row in rows])
        for name, scores in scored.items()
    }
