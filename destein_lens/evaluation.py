"""The RealToxicityPrompts protocol, run into a resumable folder.

For each method (the unsteered baseline, DeStein at some alpha, ...) every prompt gets `samples`
continuations, nucleus-sampled from per-(prompt, sample) seeds, so every method sees the same
random draws and a resumed run draws exactly what an uninterrupted one would. Finished prompts go
to the run folder (`runfolder`): an interrupted run (Ctrl-C, kill -9) loses at most the prompts
in flight, and starting it again with the same folder skips every prompt already written.
Prompts are decoded in fixed batches (consecutive prompts, the same whatever is already done and
however many ranks share the work), so every prompt is always decoded beside the same others: a
resumed or data-parallel run (`distributed`) writes what one uninterrupted process writes.
Toxicity is scored on the continuation only; perplexity is the continuation's, given the prompt,
under the unsteered model (or another one), one pass per decoding batch; the unsteered model's
own samples take it from their decoding steps instead (`perplexity.perplexity_from_steps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from . import distributed, runfolder
from .errors import DesteinError
from .files import write_atomic
from .generation import (
    SamplingConfig,
    check_prompt_lengths,
    decode_continuations,
    generate_ids,
    generate_scored,
    protocol_sampling,
)
from .metrics import summarise
from .models import load_record
from .perplexity import conditional_perplexity, perplexity_from_steps
from .prompts import Prompt, split_by_toxicity
from .registry import get_form
from .rescoring import by_scorer, rescored
from .runfolder import METRICS_FILE, gens_path
from .scoring import Scorer, get_scorer
from .steering import NO_STEERING, SteeringConfig, head_mask, is_causal, selected_heads, steer
from .vectors import DetoxVectors


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a name and its steering setting (the baseline steers nothing)."""

    name: str
    steering: SteeringConfig = NO_STEERING

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise DesteinError(f"method name must be a plain non-empty name, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.steering.to_dict()}


BASELINE = MethodSpec("baseline")


@dataclass(frozen=True)
class EvalConfig:
    """The protocol (DExperts/DeStein: nucleus p 0.9, 20 new tokens, 25 samples) and the run's knobs.

    `sampling.batch_size` is the number of sequences decoded together; `sampling.seed` seeds every
    (prompt, sample) draw. Sampling is always on: the protocol's numbers are over random draws.
    """

    sampling: SamplingConfig = field(default_factory=protocol_sampling)
    scorer: str = "profanity-check"
    threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sampling.do_sample:
            raise DesteinError("the evaluation protocol samples: use a SamplingConfig with do_sample=True")

    def to_dict(self) -> dict[str, Any]:
        """The run folder's `eval` entry (the field names run folders have always used)."""
        s = self.sampling
        d = {
            "samples": s.n,
            "max_new_tokens": s.max_new_tokens,
            "top_p": s.top_p,
            "seed": s.seed,
            "scorer": self.scorer,
            "threshold": self.threshold,
            "batch_size": s.batch_size,
            "extra": self.extra,
        }
        protocol = protocol_sampling()
        d.update(
            {k: getattr(s, k) for k in ("top_k", "temperature") if getattr(s, k) != getattr(protocol, k)}
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        """`to_dict`'s run-folder entry back to the config (its names are the folders' own, not the
        fields', so this one pair is written by hand)."""
        names = {"samples": "n", "max_new_tokens": "max_new_tokens", "top_p": "top_p", "seed": "seed"}
        names |= {"batch_size": "batch_size", "top_k": "top_k", "temperature": "temperature"}
        unknown = sorted(set(d) - set(names) - {"scorer", "threshold", "extra"})
        if unknown:
            raise DesteinError(f"unknown evaluation settings: {', '.join(unknown)}")
        sampling = replace(protocol_sampling(), **{names[k]: v for k, v in d.items() if k in names})
        return cls(sampling, d.get("scorer", "profanity-check"), d.get("threshold", 0.5), d.get("extra", {}))


def eval_config(
    samples: int = 25,
    *,
    seed: int = 0,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    scorer: str = "profanity-check",
) -> EvalConfig:
    """The protocol with the usual knobs set, in one call."""
    sampling = replace(protocol_sampling(samples, seed, max_new_tokens), batch_size=batch_size)
    return EvalConfig(sampling=sampling, scorer=scorer)


def run_config(
    model: TransformerBridge,
    prompts: Sequence[Prompt],
    methods: Sequence[MethodSpec],
    config: EvalConfig,
    vectors: DetoxVectors | None,
    ppl_model: TransformerBridge | None = None,
    provenance: dict[str, Any] | None = None,
    method_inputs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """What identifies a run: a folder resumes only the run its config.json describes. Methods
    that steer heads chosen by causal effect have the heads written out ("causal_heads"), in
    rank order, beside the vectors whose ranking chose them; methods with trained inputs have
    their digests ("method_inputs": the adapters' weights)."""
    chosen = {
        m.name: [
            f"L{layer}.H{head}" for layer, head in selected_heads(vectors, m.steering.heads, m.steering.form)
        ]
        for m in methods
        if vectors is not None and is_causal(m.steering.heads)
    }
    return {
        "eval": config.to_dict(),
        "methods": [m.to_dict() for m in methods],
        "model": load_record(model).to_dict(),
        "ppl_model": load_record(ppl_model or model).name,
        "prompts": {"n": len(prompts), "sha256": prompts_sha(prompts)},
        "vectors": vectors_id(vectors),
        **({"causal_heads": chosen} if chosen else {}),
        **({"method_inputs": method_inputs} if method_inputs else {}),
        **(provenance or {}),
    }


def evaluate(
    model: TransformerBridge,
    prompts: Sequence[Prompt],
    methods: Sequence[MethodSpec],
    out_dir: str | Path,
    config: EvalConfig,
    *,
    vectors: DetoxVectors | None = None,
    scorer: Scorer | None = None,
    extra_scorers: Sequence[Scorer] = (),
    ppl_model: TransformerBridge | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and summarise every method into `out_dir`; returns metrics.json's content.

    Everything that can be refused is refused before the first generation: method names, head
    ranges, prompt ids and lengths, the folder (another run's, or in use by another process).
    `extra_scorers` also score every stored continuation (`rescoring`; a finished folder is
    rescored without generating): each cell's metrics gain "by_scorer", EMT and TP per scorer.
    """
    inputs = check_methods(methods, vectors, model)
    check_prompts(model, prompts, config)
    scorer = scorer or get_scorer(config.scorer)
    config_dict = run_config(model, prompts, methods, config, vectors, ppl_model, provenance, inputs)
    with runfolder.hold(out_dir) as out:
        runfolder.claim(out, config_dict)
        progress = progress and distributed.is_main()
        for method in methods:
            _run_method(model, prompts, method, out, config, vectors, scorer, ppl_model or model, progress)
        distributed.barrier()  # every rank's shard is complete
        if distributed.is_main():
            for method in methods:
                runfolder.merge(out, method.name, [p.id for p in prompts])
            write_atomic(
                out / METRICS_FILE,
                json.dumps(
                    _metrics(out, prompts, methods, config, [scorer, *extra_scorers], config_dict), indent=1
                ),
            )
        distributed.barrier()  # metrics.json is written: every rank returns the same metrics
        return json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))


def _metrics(
    out: Path,
    prompts: Sequence[Prompt],
    methods: Sequence[MethodSpec],
    config: EvalConfig,
    scorers: Sequence[Scorer],
    config_dict: dict[str, Any],
) -> dict[str, Any]:
    """Every cell's summary under the folder's scorer (scorers[0]), overall and per prompt split;
    with more scorers, each one's EMT and TP beside it."""
    metrics: dict[str, Any] = {"scorer": scorers[0].name, "config": config_dict}
    if len(scorers) > 1:
        metrics["scorers"] = [s.name for s in scorers]
    splits = split_by_toxicity(prompts, config.threshold)
    for method in methods:
        rows = cell_rows(out, method.name, prompts)
        scored = {
            scorers[0].name: {r["prompt"]["id"]: [g["toxicity"] for g in r["generations"]] for r in rows}
        }
        scored |= {s.name: rescored(out, method.name, rows, s) for s in scorers[1:]}
        metrics[method.name] = _summary(rows, scored)
        by_id = {r["prompt"]["id"]: r for r in rows}
        for split, members in splits.items():
            if members:
                metrics[method.name][split] = _summary([by_id[p.id] for p in members], scored)
    return metrics


def cell_rows(out: Path, method: str, prompts: Sequence[Prompt]) -> list[dict[str, Any]]:
    """A method's finished rows in the order of `prompts` (every cell of a folder alike, so
    cells can be compared prompt by prompt)."""
    by_id = {row["prompt"]["id"]: row for row in runfolder.read_rows(gens_path(out, method), truncate=False)}
    return [by_id[p.id] for p in prompts]


def samples_of(rows: Sequence[dict[str, Any]]) -> tuple[list[list[float]], list[list[float]]]:
    """(toxicity scores, perplexities), each [prompt][sample]; a missing perplexity is NaN."""
    gens = [row["generations"] for row in rows]
    return (
        [[g["toxicity"] for g in gs] for gs in gens],
        [[g["perplexity"] if g["perplexity"] is not None else float("nan") for g in gs] for gs in gens],
    )


def check_methods(
    methods: Sequence[MethodSpec], vectors: DetoxVectors | None, model: TransformerBridge | None = None
) -> dict[str, dict[str, str]]:
    """Distinct names; steered methods have vectors (for this model), heads within range and what
    else they need (`Form.check`). Returns, per form that needs more, those inputs' digests."""
    if len({m.name for m in methods}) != len(methods):
        raise DesteinError("method names must be distinct")
    steered = [m for m in methods if m.steering.steered]
    needing = [m.name for m in steered if get_form(m.steering.form).needs_vectors]
    if needing and vectors is None:
        raise DesteinError(f"{needing[0]} steers with detox vectors; none were given")
    if vectors is not None:
        if model is not None:
            vectors.check_compatible(model)
        for method in steered:
            head_mask(vectors, method.steering.heads, method.steering.form)
    return {
        name: check(model)
        for name in sorted({m.steering.form for m in steered} if model is not None else ())
        if (check := get_form(name).check) is not None
    }


def check_prompts(model: TransformerBridge, prompts: Sequence[Prompt], config: EvalConfig) -> None:
    """At least one prompt, distinct ids (resume and metrics key on them), every prompt fits the context."""
    if not prompts:
        raise DesteinError("no prompts to evaluate")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DesteinError(f"prompt id {p.id!r} occurs twice; prompt ids must be unique")
        seen.add(p.id)
    check_prompt_lengths(model, [p.text for p in prompts], config.sampling.max_new_tokens)


def _summary(rows: Sequence[dict[str, Any]], scored: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    scores, perplexities = samples_of(rows)
    summary = summarise(scores, [[g["text"] for g in row["generations"]] for row in rows], perplexities)
    if len(scored) > 1:
        summary["by_scorer"] = by_scorer(rows, scored)
    return summary


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
    """This rank's share of the method's unfinished batches, appended to its own file.

    The unsteered model's perplexity of its own samples comes from its decoding steps.
    """
    reuse = not method.steering.steered and ppl_model is model
    done = set(runfolder.finished_rows(out_dir, method.name))
    distributed.barrier()  # every rank shares out the same unfinished batches before any writes
    sampling = config.sampling
    samples = sampling.n
    per_batch = max(1, sampling.batch_size // samples)
    indexed = list(enumerate(prompts))
    batches = [indexed[i : i + per_batch] for i in range(0, len(indexed), per_batch)]
    mine = distributed.share([b for b in batches if any(p.id not in done for _, p in b)])
    bar = tqdm(total=sum(len(b) for b in mine), desc=method.name, unit="prompt", disable=not progress)
    own = runfolder.own_path(out_dir, method.name)
    own.parent.mkdir(exist_ok=True)
    with open(own, "a", encoding="utf-8") as sink:
        for chunk in mine:
            texts = [p.text for _, p in chunk for _ in range(samples)]
            generators = [
                torch.Generator().manual_seed(_row_seed(sampling.seed, i, j))
                for i, _ in chunk
                for j in range(samples)
            ]
            steering = (
                steer(model, vectors, method.steering, prompts=texts)
                if method.steering.steered
                else contextlib.nullcontext()
            )
            with steering:
                if reuse:
                    new_ids, logprobs = generate_scored(model, texts, sampling, generators)
                else:
                    new_ids = generate_ids(model, texts, sampling, generators)
            continuations = decode_continuations(model, new_ids)
            scores = scorer.score(continuations)
            ppl: list[float | None] = [None] * len(texts)
            if reuse:
                ppl = perplexity_from_steps(model.tokenizer, texts, continuations, new_ids, logprobs)
            # The whole batch, done or not, is one perplexity pass: a resumed run recomputes
            # exactly the same floats.
            redo = [i for i, x in enumerate(ppl) if x is None]
            if redo:
                passed = conditional_perplexity(
                    ppl_model,
                    [texts[i] for i in redo],
                    [continuations[i] for i in redo],
                    batch_size=len(redo),
                )
                for i, x in zip(redo, passed):
                    ppl[i] = x
            lines = []
            for n, (_, prompt) in enumerate(chunk):
                if prompt.id in done:  # finished before an interruption cut its batch short
                    continue
                rows = slice(n * samples, (n + 1) * samples)
                ppls = ppl[rows]
                lines.append(
                    {
                        "prompt": {"text": prompt.text, "toxicity": prompt.toxicity, "id": prompt.id},
                        "generations": [
                            {"text": text, "toxicity": score, "perplexity": _finite_or_none(ppl)}
                            for text, score, ppl in zip(continuations[rows], scores[rows], ppls)
                        ],
                    }
                )
            runfolder.append_lines(sink, lines)
            bar.update(len(chunk))
    bar.close()


def _row_seed(seed: int, prompt_index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def prompts_sha(prompts: Sequence[Prompt]) -> str:
    payload = json.dumps([[p.id, p.text] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def vectors_id(vectors: DetoxVectors | None) -> dict[str, Any] | None:
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
