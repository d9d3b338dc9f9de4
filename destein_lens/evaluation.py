"""The RealToxicityPrompts protocol, run into a resumable folder.

For each method (the unsteered baseline, DeStein at some alpha, ...) every prompt gets `samples`
continuations, nucleus-sampled from per-(prompt, sample) seeds, so every method sees the same
random draws and a resumed run draws exactly what an uninterrupted one would. Each finished
prompt is appended to `prompted_gens_<method>.jsonl` (the DExperts layout) and fsynced: an
interrupted run (Ctrl-C, kill -9) loses at most the prompts in flight, and starting it again with
the same folder skips every prompt already written. Toxicity is scored on the continuation only;
perplexity is the continuation's, given the prompt, under the unsteered model (or another one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .errors import DesteinError
from .files import write_atomic
from .generation import SamplingConfig, decode_continuations, generate_ids
from .metrics import summarise
from .models import load_record
from .perplexity import conditional_perplexity
from .prompts import Prompt, split_by_toxicity
from .scoring import Scorer, get_scorer
from .steering import Heads, steer
from .vectors import DetoxVectors

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: no steering (alpha 0) or steering with the run's vectors."""

    name: str
    alpha: float = 0.0
    heads: Heads = "all"
    positions: str = "all"
    form: str = "destein"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise DesteinError(f"method name must be a plain non-empty name, got {self.name!r}")
        if not math.isfinite(self.alpha):
            raise DesteinError(f"alpha must be a finite number, got {self.alpha}")
        if isinstance(self.heads, list):
            object.__setattr__(self, "heads", tuple(tuple(h) for h in self.heads))

    @property
    def steered(self) -> bool:
        return self.alpha != 0.0


BASELINE = MethodSpec("baseline")


@dataclass(frozen=True)
class EvalConfig:
    """The protocol (DExperts/DeStein defaults) and the run's knobs."""

    samples: int = 25
    max_new_tokens: int = 20
    top_p: float = 0.9
    seed: int = 0
    scorer: str = "profanity-check"
    threshold: float = 0.5
    batch_size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise DesteinError(f"samples must be at least 1, got {self.samples}")
        if self.batch_size < 1:
            raise DesteinError(f"batch_size must be at least 1, got {self.batch_size}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            do_sample=True,
            max_new_tokens=self.max_new_tokens,
            top_p=self.top_p,
            n=self.samples,
            seed=self.seed,
        )


def gens_path(out_dir: Path, method: str) -> Path:
    return out_dir / f"prompted_gens_{method}.jsonl"


def evaluate(
    model: TransformerBridge,
    prompts: Sequence[Prompt],
    methods: Sequence[MethodSpec],
    out_dir: str | Path,
    config: EvalConfig,
    *,
    vectors: DetoxVectors | None = None,
    scorer: Scorer | None = None,
    ppl_model: TransformerBridge | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and summarise every method into `out_dir`; returns metrics.json's content."""
    if not prompts:
        raise DesteinError("no prompts to evaluate")
    if len({m.name for m in methods}) != len(methods):
        raise DesteinError("method names must be distinct")
    if any(m.steered for m in methods) and vectors is None:
        raise DesteinError("a steered method needs detox vectors")
    if vectors is not None:
        vectors.check_compatible(model)
    out_dir = Path(out_dir)
    scorer = scorer or get_scorer(config.scorer)
    run_config = {
        "eval": asdict(config),
        "methods": [asdict(m) for m in methods],
        "model": load_record(model).to_dict(),
        "ppl_model": load_record(ppl_model or model).name,
        "prompts": {"n": len(prompts), "sha256": _prompts_sha(prompts)},
        "vectors": _vectors_id(vectors),
        **(provenance or {}),
    }
    _claim_folder(out_dir, run_config)
    for method in methods:
        _run_method(model, prompts, method, out_dir, config, vectors, scorer, ppl_model or model, progress)
    metrics: dict[str, Any] = {"scorer": scorer.name, "config": run_config}
    for method in methods:
        rows = _read_rows(gens_path(out_dir, method.name), truncate=False)
        by_id = {row["prompt"]["id"]: row for row in rows}
        ordered = [by_id[p.id] for p in prompts]
        metrics[method.name] = _summary(ordered)
        splits = split_by_toxicity(prompts, config.threshold)
        for split, members in splits.items():
            if members:
                metrics[method.name][split] = _summary([by_id[p.id] for p in members])
    write_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=1))
    return metrics


def _summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    gens = [row["generations"] for row in rows]
    return summarise(
        [[g["toxicity"] for g in gs] for gs in gens],
        [[g["text"] for g in gs] for gs in gens],
        [[g["perplexity"] if g["perplexity"] is not None else float("nan") for g in gs] for gs in gens],
    )


def _run_method(
    model: TransformerBridge,
    prompts: Sequence[Prompt],
    method: MethodSpec,
    out_dir: Path,
    config: EvalConfig,
    vectors: DetoxVectors | None,
    scorer: Scorer,
    ppl_model: TransformerBridge,
    progress: bool,
) -> None:
    path = gens_path(out_dir, method.name)
    done = {row["prompt"]["id"] for row in _read_rows(path, truncate=True)}
    pending = [(i, p) for i, p in enumerate(prompts) if p.id not in done]
    per_batch = max(1, config.batch_size // config.samples)
    sampling = config.sampling()
    bar = tqdm(
        total=len(prompts),
        initial=len(prompts) - len(pending),
        desc=method.name,
        unit="prompt",
        disable=not progress,
    )
    with open(path, "a", encoding="utf-8") as sink:
        for start in range(0, len(pending), per_batch):
            chunk = pending[start : start + per_batch]
            texts = [p.text for _, p in chunk for _ in range(config.samples)]
            generators = [
                torch.Generator().manual_seed(_row_seed(config.seed, i, j))
                for i, _ in chunk
                for j in range(config.samples)
            ]
            steering = (
                steer(
                    model,
                    vectors,
                    method.alpha,
                    heads=method.heads,
                    positions=method.positions,
                    form=method.form,
                )
                if method.steered and vectors is not None
                else contextlib.nullcontext()
            )
            with steering:
                new_ids = generate_ids(model, texts, sampling, generators)
            continuations = decode_continuations(model, new_ids)
            scores = scorer.score(continuations)
            ppls = conditional_perplexity(ppl_model, texts, continuations, batch_size=config.batch_size)
            for n, (_, prompt) in enumerate(chunk):
                rows = range(n * config.samples, (n + 1) * config.samples)
                line = {
                    "prompt": {"text": prompt.text, "toxicity": prompt.toxicity, "id": prompt.id},
                    "generations": [
                        {
                            "text": continuations[r],
                            "toxicity": scores[r],
                            "perplexity": _finite_or_none(ppls[r]),
                        }
                        for r in rows
                    ],
                }
                sink.write(json.dumps(line, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(chunk))
    bar.close()


def _row_seed(seed: int, prompt_index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def _read_rows(path: Path, *, truncate: bool) -> list[dict[str, Any]]:
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
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DesteinError(f"{path}:{n}: not a complete JSON line; the run folder is damaged") from None
    return rows


def _claim_folder(out_dir: Path, run_config: dict[str, Any]) -> None:
    """Start a run folder, or resume it only if it holds this very run."""
    path = out_dir / CONFIG_FILE
    wanted = json.loads(json.dumps(run_config))  # tuples -> lists, as read back
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise DesteinError(f"{path} is unreadable; use another --out folder") from None
        if existing != wanted:
            differing = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            raise DesteinError(
                f"{out_dir} holds another run (its config differs in: {', '.join(differing)}); "
                "use another --out folder"
            )
        return
    if out_dir.exists() and any(out_dir.glob("prompted_gens_*.jsonl")):
        raise DesteinError(f"{out_dir} holds generations but no {CONFIG_FILE}; use another --out folder")
    write_atomic(path, json.dumps(wanted, indent=1))


def _prompts_sha(prompts: Sequence[Prompt]) -> str:
    payload = json.dumps([[p.id, p.text] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _vectors_id(vectors: DetoxVectors | None) -> dict[str, Any] | None:
    if vectors is None:
        return None
    digest = hashlib.sha256(vectors.directions.numpy().tobytes()).hexdigest()
    return {
        "directions_sha256": digest,
        "site": vectors.site,
        "k": vectors.k,
        "pairs_sha256": vectors.pairs_sha256,
        "pairs_source": vectors.pairs_source,
        "probe_texts": vectors.probe_texts,
    }
