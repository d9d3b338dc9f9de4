"""Causal head selection: rank heads by what steering each one alone does, at every vector build.

The workbench's attribution study found that probe accuracy (DeStein's ranking) barely predicts
a head's causal effect, and that the top heads by single-head steering effect detoxify far more at
equal k. `causal_rankings` makes that ranking part of the vectors, for any head-wise form, from
the first-order steering effect (`gradient.first_order_steering`: one forward and backward per
batch instead of a forward per head), always scored on pairs the directions were not built on:

- cross-fitted (default, needs nothing beyond the vectors' own pairs, so it works offline on the
  built-in pairs): the pairs are cut into folds; each fold is scored with vectors rebuilt from
  the other folds, same settings. Every pair is scored once, out of sample, and the two folds'
  own rankings show how much the choice of scoring pairs moves the selected heads
  (`CausalRanking.fold_overlap`);
- or on separate held-out pairs (`held=`), disjoint from the vectors' pairs, with the vectors
  themselves.

The effect of a single head is first order in the strength, so the ranking barely depends on
alpha; `DEFAULT_STRENGTH` is recorded with it. Steer the top k with `heads="causal:k"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from transformer_lens.model_bridge import TransformerBridge

from ..errors import DesteinError
from ..pairs import SteeringPairs
from ..registry import DEFAULT_STRENGTH, get_form
from ..vectors import CausalRanking, DetoxVectors, build_vectors, rank_heads
from .gradient import first_order_steering
from .heldout import HeldOut, held_out, score
from .selection import fold_pairs
from .steered import steered_scores

N_FOLDS = 2


def causal_rankings(
    model: TransformerBridge,
    vectors: DetoxVectors,
    pairs: SteeringPairs,
    *,
    forms: Sequence[str] = ("destein",),
    held: SteeringPairs | None = None,
    n_folds: int = N_FOLDS,
    alpha: float = DEFAULT_STRENGTH,
    confirm: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> DetoxVectors:
    """`vectors` with a `CausalRanking` for each head-wise form in `forms` (module docstring).

    `pairs` are the pairs `vectors` were built from (checked by digest); the model should be the
    float32 load the vectors were built with. `confirm` > 0 re-scores each scoring's top `confirm`
    heads with the exact single-head steering effect (one forward per head and side): where the
    first order is off at the top (SmolLM2's layer 0), the shortlist is ranked by what steering
    does, the rest by the estimate.
    """
    check_forms(forms)
    if pairs.sha256() != vectors.pairs_sha256:
        raise DesteinError("these are not the pairs the vectors were built from")
    if held is not None:
        seen = set(pairs.toxic) | set(pairs.nontoxic)
        if set(held.toxic) & seen or set(held.nontoxic) & seen:
            raise DesteinError("the held-out pairs share texts with the vectors' pairs; use other pairs")
        scorings = [(vectors, held)]
        scored_on = {"how": "held-out", "source": held.source, "sha256": held.sha256(), "n": len(held)}
    else:  # each fold scored with vectors from the other folds
        folds = fold_pairs(pairs, n_folds)
        scorings = [
            (_rebuilt(model, vectors, _without(pairs, folds, i), forms, batch_size, progress), fold)
            for i, fold in enumerate(folds)
        ]
        scored_on = {
            "how": "cross-fit",
            "source": pairs.source,
            "sha256": pairs.sha256(),
            "n": len(pairs),
            "fold_sizes": [len(f) for f in folds],
        }
    parts = []
    for scoring, scored in scorings:
        held_scored = held_out(model, scored, batch_size=batch_size)
        part = first_order_steering(model, scoring, held_scored, forms, alpha=alpha, progress=progress)
        if confirm:
            base = score(model, held_scored).gap  # once per scoring, whatever the forms
            part = {
                form: _confirmed(model, scoring, held_scored, base, v, form, alpha, confirm)
                for form, v in part.items()
            }
        parts.append(part)
    values = {form: torch.cat([part[form] for part in parts], dim=-1) for form in forms}
    scored_on |= {"confirmed_top": confirm} if confirm else {}
    made = {form: CausalRanking(form, alpha, values[form], scored_on) for form in forms}
    return replace(vectors, causal={**vectors.causal, **made})


def check_forms(forms: Sequence[str]) -> list[str]:
    """Forms a causal ranking can be built for (head-wise ones), checked without the model."""
    for form in forms:
        if not get_form(form).head_wise:
            raise DesteinError(
                f"{form} does not act on heads: a causal head ranking needs a head-wise method"
            )
    return list(forms)


def _confirmed(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    base: torch.Tensor,
    values: torch.Tensor,
    form: str,
    alpha: float,
    top: int,
) -> torch.Tensor:
    """`values` with the top `top` heads by mean replaced by their exact single-head effect
    (`base`: the unsteered gap)."""
    out = values.clone()
    for layer, head in rank_heads(values.mean(-1))[:top]:
        out[layer, head] = base - steered_scores(model, vectors, held, [(layer, head)], alpha, form).gap
    return out


def _without(pairs: SteeringPairs, folds: list[SteeringPairs], i: int) -> SteeringPairs:
    """Every fold's pairs but fold `i`'s."""
    others = [f for j, f in enumerate(folds) if j != i]
    return SteeringPairs(
        [t for f in others for t in f.toxic], [t for f in others for t in f.nontoxic], pairs.source
    )


def _rebuilt(
    model: TransformerBridge,
    vectors: DetoxVectors,
    pairs: SteeringPairs,
    forms: Sequence[str],
    batch_size: int,
    progress: bool,
) -> DetoxVectors:
    """Vectors from `pairs` with `vectors`' own settings (and the fits `forms` steer with)."""
    return build_vectors(
        model,
        pairs,
        site=vectors.site,  # type: ignore[arg-type]
        k=vectors.k,
        prefixes=vectors.prefixes,
        probe_texts=vectors.probe_texts,
        probe_method=vectors.probe_method,
        train_frac=vectors.extra.get("train_frac", 0.8),
        batch_size=batch_size,
        fit_forms=[f for f in forms if get_form(f).fit is not None],
        progress=progress,
    )
