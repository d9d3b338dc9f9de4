"""The attribution study folder: every study on one model, one set of vectors and one set of held-out
pairs, resumable, with its report.

    <out>/config.json            what the study is (a folder holds one study; another is refused)
    <out>/vectors.*              the vectors studied (built from --pairs, or copied in)
    <out>/<result>.safetensors   per-pair effects (+ .json: what they mean), one pair per study result
    <out>/.partial/<study>.*     finished heads of a study in progress (a killed run resumes there)
    <out>/selection_eval/        the evaluation harness's run folder for the selection's few k
    <out>/report.md              the answers, with intervals

`run_study` runs the requested studies in order (steering before selection, which ranks by it)
and skips those already saved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from .. import distributed, runfolder
from ..config_io import from_dict, to_dict
from ..errors import DesteinError
from ..evaluation import EvalConfig
from ..files import write_atomic
from ..generation import protocol_sampling
from ..models import load_record
from ..pairs import SteeringPairs
from ..prompts import Prompt
from ..registry import DEFAULT_STRENGTH, get_form
from ..scoring import Scorer
from ..steering import SteeringConfig
from ..vectors import DetoxVectors
from .agreement import Agreement, agreement
from .dla import DirectLogits
from .effects import HeadEffects
from .heldout import held_out
from .report import study_report
from .selection import (
    KS,
    N_FOLDS,
    RANDOM_SEEDS,
    SelectionCurves,
    rankings,
    selection_evaluation,
)
from .studies import STUDIES, Study, StudyContext, parse_studies, ranked_results, saved_effects

AGREEMENT_K = 8
VECTORS = "vectors"


@dataclass(frozen=True)
class StudySettings:
    """The knobs of a study; all of them are part of what the folder holds."""

    alpha: float = DEFAULT_STRENGTH  # steering strength of the steering and selection studies
    form: str = "destein"  # the head-wise method the steering and selection studies steer with
    batch_size: int = 16  # pairs per forward
    selection_ks: tuple[int, ...] = KS
    random_seeds: tuple[int, ...] = RANDOM_SEEDS
    eval_ks: tuple[int, ...] = (4, 16)  # k of the selection's EMT / TP / perplexity runs
    eval_rankers: tuple[str, ...] = ("probe", "causal", "random-0")
    eval_samples: int = 2
    eval_tokens: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_samples < 1 or self.eval_tokens < 1:
            raise DesteinError("batch size, samples and tokens must be at least 1")
        if any(k < 1 for k in self.selection_ks + self.eval_ks):
            raise DesteinError("every k must be at least 1")
        SteeringConfig(alpha=self.alpha, form=self.form)  # the form's own range of strengths
        if not get_form(self.form).head_wise:
            raise DesteinError(
                f"{self.form} does not act on heads: head attribution needs a head-wise method"
            )


@dataclass(frozen=True, eq=False)
class StudyResults:
    """What a study folder holds, read back (studies not run are absent)."""

    config: dict[str, Any]
    effects: dict[str, HeadEffects]
    dla: DirectLogits | None
    selection: SelectionCurves | None
    evaluation: dict[str, Any] | None
    agreement: Agreement | None
    probe_accuracy: torch.Tensor

    @property
    def settings(self) -> StudySettings:
        """The folder's knobs as the object that ran them."""
        return from_dict(StudySettings, self.config["settings"], what="study settings")


def held_out_pairs(spec: str | Path, n: int, vector_pairs: SteeringPairs) -> SteeringPairs:
    """The first `n` pairs of `spec` that share no text with the vectors' pairs."""
    from ..pairs import load_pairs

    seen = set(vector_pairs.toxic) | set(vector_pairs.nontoxic)
    pool = load_pairs(spec, max_pairs=n + len(vector_pairs))
    keep = [i for i in range(len(pool)) if pool.toxic[i] not in seen and pool.nontoxic[i] not in seen][:n]
    if not keep:
        raise DesteinError(f"{spec} has no pair that the vectors were not built on")
    toxic, nontoxic = zip(*[(pool.toxic[i], pool.nontoxic[i]) for i in keep])
    return SteeringPairs(toxic, nontoxic, f"{pool.source} (first {len(keep)} not in the vectors' pairs)")


def check_held_out(studies: Sequence[str], held_pairs: SteeringPairs, vector_pairs_sha256: str) -> None:
    """The held-out pairs suit the studies: not the vectors' own, enough for the selection's folds.

    Needs no model, so the command line checks it before loading one."""
    if held_pairs.sha256() == vector_pairs_sha256:
        raise DesteinError("the held-out pairs are the pairs the vectors were built on; use other pairs")
    if "selection" in studies and len(held_pairs) < N_FOLDS:
        raise DesteinError(
            f"the selection study needs at least {N_FOLDS} held-out pairs, got {len(held_pairs)}"
        )


def run_study(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held_pairs: SteeringPairs,
    out_dir: str | Path,
    *,
    studies: Sequence[str] = tuple(STUDIES),
    settings: StudySettings | None = None,
    prompts: Sequence[Prompt] = (),
    scorers: Sequence[Scorer] = (),
    progress: bool = True,
) -> StudyResults:
    """Run `studies` into `out_dir` (resuming), then the agreement and the report; returns all of it.

    The held-out pairs must be disjoint from the vectors' pairs. The selection's "causal" ranker
    is cross-fitted over two folds of them (`selection`).
    `prompts` are the selection's evaluation prompts (none: no EMT / TP runs), scored by
    `scorers` (default profanity-check): the first is the evaluation folder's own, each other one
    also scores every continuation, as in `evaluate`.
    """
    studies = parse_studies(",".join(studies))  # run order; selection brings steering
    settings = settings or StudySettings()
    vectors.check_compatible(model)
    check_held_out(studies, held_pairs, vectors.pairs_sha256)
    config = {
        "model": load_record(model).to_dict(),
        "vectors": {"pairs_sha256": vectors.pairs_sha256, "n_pairs": vectors.n_pairs, "k": vectors.k},
        "held_out": {"sha256": held_pairs.sha256(), "source": held_pairs.source, "n": len(held_pairs)},
        "prompts": [p.id for p in prompts],
        "settings": to_dict(settings),
    }
    with runfolder.hold(out_dir) as out:
        runfolder.claim(out, config)
        distributed.main_writes(lambda: _save_vectors(vectors, out))
        held = held_out(model, held_pairs, batch_size=settings.batch_size)
        (out / ".partial").mkdir(exist_ok=True)
        for name in studies:
            _run_one(
                STUDIES[name],
                StudyContext(model, vectors, held, held_pairs, out, settings, prompts, progress),
            )
            if name == "selection":
                _selection_evaluation(model, vectors, out, settings, prompts, scorers, progress)
        effects = load_study(out).effects
        ranked = {r: effects[r] for r in ranked_results() if r in effects}
        if ranked:  # redone every time: a resumed folder may have gained a study
            agreed = agreement({"probe": probe_order_score(vectors), **ranked}, k=AGREEMENT_K)
            distributed.main_writes(lambda: agreed.save(out / "agreement"))
        results = load_study(out)
        distributed.main_writes(lambda: write_atomic(out / "report.md", study_report(results)))
    return results


def _run_one(study: Study, ctx: StudyContext) -> None:
    """A study through the one shared path: skipped when saved, else computed (its heads
    checkpointed), saved by rank 0, and its checkpoints cleared."""
    done = all((ctx.out / f"{r}.safetensors").exists() for r in study.results)
    distributed.barrier()  # every rank has looked before rank 0 writes
    if done:
        return
    results = study.compute(ctx)
    distributed.main_writes(lambda: [result.save(ctx.out / name) for name, result in results.items()])
    for ckpt in ctx.checkpoints:
        ckpt.clear()


def _selection_evaluation(
    model: TransformerBridge,
    vectors: DetoxVectors,
    out: Path,
    settings: StudySettings,
    prompts: Sequence[Prompt],
    scorers: Sequence[Scorer],
    progress: bool,
) -> None:
    """EMT / TP / perplexity of the selection's few k with the evaluation harness (resumable)."""
    steering = HeadEffects.load(out / "steering")
    if prompts and settings.eval_ks:
        sampling = protocol_sampling(
            n=settings.eval_samples, max_new_tokens=settings.eval_tokens, seed=settings.seed
        )
        config = EvalConfig(sampling=sampling, **({"scorer": scorers[0].name} if scorers else {}))
        # the generation prompts are not the held-out pairs: here causal ranks on all of them
        gradient = saved_effects(out, "atp_steering")
        orders = rankings(
            vectors, steering.mean(), settings.random_seeds, gradient.mean() if gradient else None
        )
        eval_orders = {name: orders[name] for name in settings.eval_rankers if name in orders}
        n_cells = vectors.shape[0] * vectors.shape[1]
        selection_evaluation(
            model,
            vectors,
            eval_orders,
            [k for k in settings.eval_ks if k < n_cells],
            prompts,
            out / "selection_eval",
            config,
            alpha=settings.alpha,
            form=settings.form,
            extra_scorers=scorers[1:],
            progress=progress,
        )


def probe_order_score(vectors: DetoxVectors) -> torch.Tensor:
    """[n_layers, n_heads] strictly decreasing along `vectors.ranking()`: the probe ranking with the
    tie-break steering uses (accuracies tie often), so its top k are the heads `steer(heads=k)` picks."""
    n_layers, n_heads = vectors.shape
    score = torch.zeros(n_layers, n_heads)
    for position, (layer, head) in enumerate(vectors.ranking()):
        score[layer, head] = n_layers * n_heads - position
    return score


def _save_vectors(vectors: DetoxVectors, out: Path) -> None:
    if not (out / f"{VECTORS}.safetensors").exists():
        vectors.save(out / VECTORS)


def load_study(folder: str | Path) -> StudyResults:
    """Everything a study folder holds (no model needed): for figures, reports and notebooks."""
    out = Path(folder)
    config = runfolder.read_config(out)
    if config is None or "held_out" not in config:
        raise DesteinError(f"{out} is not an attribution study folder (no study config.json)")
    effects = {
        name: HeadEffects.load(out / name)
        for study in STUDIES.values()
        if study.per_pair
        for name in study.results
        if (out / f"{name}.safetensors").exists()
    }
    metrics = out / "selection_eval" / runfolder.METRICS_FILE
    return StudyResults(
        config=config,
        effects=effects,
        dla=DirectLogits.load(out / "dla") if (out / "dla_tokens.safetensors").exists() else None,
        selection=SelectionCurves.load(out / "selection")
        if (out / "selection.safetensors").exists()
        else None,
        evaluation=json.loads(metrics.read_text()) if metrics.exists() else None,
        agreement=Agreement.load(out / "agreement") if (out / "agreement.safetensors").exists() else None,
        probe_accuracy=DetoxVectors.load(out / VECTORS).probe_accuracy,
    )
