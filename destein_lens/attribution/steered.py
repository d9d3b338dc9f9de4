"""Steering studies: each head steered alone, and every head steered but one (leave-one-out).

Probe accuracy says a head *separates* toxic from non-toxic text; these say what moving heads
along their DeStein directions does to the model's preference for the toxic side, on held-out
pairs (`heldout`):

    steering(l, h)      = gap(unsteered)         - gap(only head (l, h) steered)
    leave_one_out(l, h) = gap(all but (l, h))    - gap(all heads steered)

per pair, nats per token. Positive steering: steering that head alone makes the toxic side less
likely. Positive leave-one-out: within full DeStein, that head does part of the detoxifying,
so dropping it leaves the gap wider. One forward per head per batch of pairs.
"""

from __future__ import annotations

import itertools

import torch
from transformer_lens.model_bridge import TransformerBridge

from ..registry import DEFAULT_STRENGTH
from ..steering import steer
from ..vectors import DetoxVectors
from .effects import Checkpoint, HeadEffects, per_head
from .heldout import HeldOut, Scores, score


def steered_scores(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    heads: list[tuple[int, int]],
    alpha: float,
    form: str = "destein",
) -> Scores:
    """The held-out scores with `heads` steered by the head-wise `form` at `alpha`; no heads: unsteered."""
    if not heads:
        return score(model, held)
    with steer(model, vectors, alpha=alpha, heads=heads, form=form):
        return score(model, held)


def steering_effects(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    *,
    alpha: float = DEFAULT_STRENGTH,
    form: str = "destein",
    baseline: Scores | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> dict[str, HeadEffects]:
    """Each head steered alone: "steering" (the gap) and "steering_mass" (toxic next-token mass)."""
    base = baseline or score(model, held)
    ckpt = checkpoint or Checkpoint(None)

    def cell(layer: int, head: int) -> torch.Tensor:
        s = steered_scores(model, vectors, held, [(layer, head)], alpha, form)
        return torch.stack([base.gap - s.gap, (base.toxic_logmass - s.toxic_logmass).mean(0)])

    values = per_head(vectors.shape, cell, ckpt, "steering", progress)
    return {
        "steering": HeadEffects(
            "steering", values[0], "nats/token", f"gap(unsteered) - gap(head steered alone, alpha {alpha:g})"
        ),
        "steering_mass": HeadEffects(
            "steering_mass",
            values[1],
            "nats",
            "log p(toxic next token), unsteered - head steered alone, mean of both sides",
        ),
    }


def leave_one_out(
    model: TransformerBridge,
    vectors: DetoxVectors,
    held: HeldOut,
    *,
    alpha: float = DEFAULT_STRENGTH,
    form: str = "destein",
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> dict[str, HeadEffects]:
    """Every head steered but one: how much each head adds within full DeStein."""
    n_layers, n_heads = vectors.shape
    every = list(itertools.product(range(n_layers), range(n_heads)))
    ckpt = checkpoint or Checkpoint(None)
    full = ckpt.get_or_compute("all", lambda: steered_scores(model, vectors, held, every, alpha, form).gap)

    def cell(layer: int, head: int) -> torch.Tensor:
        rest = [h for h in every if h != (layer, head)]
        return (steered_scores(model, vectors, held, rest, alpha, form).gap - full)[None]

    values = per_head(vectors.shape, cell, ckpt, "leave-one-out", progress)
    meaning = f"gap(all heads but this one steered) - gap(all heads steered), alpha {alpha:g}"
    return {"leave_one_out": HeadEffects("leave_one_out", values[0], "nats/token", meaning)}
