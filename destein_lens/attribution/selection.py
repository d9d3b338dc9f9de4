"""Selection curves: steer the top-k heads of a ranking, for growing k, and measure the gap.

Does choosing heads by causal effect beat the paper's choice by probe accuracy at equal k? Each
ranker orders the heads, and for every k the top k are steered together (DeStein's form):

    effect(ranker, k) = gap(unsteered) - gap(top-k steered),   per selection pair

Rankers: "probe" (`DetoxVectors.ranking()`, from the vectors' own pairs), "causal" (the single-head
steering effect), "gradient" (its first-order estimate, when the folder holds the gradient study:
what `heads="causal:k"` steers by) and "random-<seed>" (several seeds). The causal rankings are
cross-fitted: the held-out pairs are cut into folds, and each fold's curve steers the heads
ranked on the *other* folds' pairs, never on its own (choosing and scoring on the same pairs
would flatter it). Every pair thus enters the curve once, scored out of sample.
`selection_evaluation` adds EMT, TP and perplexity for a few k with the evaluation harness.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .. import distributed
from ..errors import DesteinError
from ..evaluation import BASELINE, EvalConfig, MethodSpec, evaluate
from ..pairs import SteeringPairs
from ..prompts import Prompt
from ..registry import DEFAULT_STRENGTH
from ..scoring import Scorer
from ..steering import SteeringConfig
from ..store import load_result, save_result
from ..vectors import DetoxVectors
from .effects import CONFIDENCE, Checkpoint, HeadEffects, rank_heads
from .heldout import HeldOut, score
from .steered import steered_scores

KS = (1, 2, 4, 8, 16, 32)  # and always every head
RANDOM_SEEDS = (0, 1, 2)
N_FOLDS = 2
Order = list[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class SelectionCurves:
    """The gap effect of steering each ranker's top-k heads, per selection pair."""

    rankers: tuple[str, ...]
    ks: tuple[int, ...]
    effect: torch.Tensor  # [n_rankers, n_ks, n_pairs], nats per token
    orders: list[dict[str, Order]]  # per fold, each ranker's head order
    alpha: float

    def __post_init__(self) -> None:
        shape, n_rankers, n_ks = tuple(self.effect.shape), len(self.rankers), len(self.ks)
        if len(shape) != 3 or shape[:2] != (n_rankers, n_ks) or shape[2] < 1:
            raise DesteinError(
                f"selection effect must be [{n_rankers} rankers, {n_ks} k, n_pairs], got {shape}"
            )
        if not self.ks or self.ks[0] < 1 or any(b <= a for a, b in zip(self.ks, self.ks[1:])):
            raise DesteinError(f"selection ks must be increasing positive counts, got {self.ks}")

    @cached_property
    def _effects(self) -> HeadEffects:
        """The effect as a per-pair result, so its interval is the one bootstrap, computed once."""
        return HeadEffects("selection", self.effect, "nats/token", "")

    def mean(self) -> torch.Tensor:
        return self.effect.mean(-1)

    def interval(self, confidence: float = CONFIDENCE) -> tuple[torch.Tensor, torch.Tensor]:
        return self._effects.interval(confidence)

    def save(self, path: Path) -> None:
        meta = {
            "rankers": list(self.rankers),
            "ks": list(self.ks),
            "alpha": self.alpha,
            "orders": [
                {name: [list(h) for h in order] for name, order in fold.items()} for fold in self.orders
            ],
        }
        save_result(path, "selection", {"effect": self.effect}, meta)

    @classmethod
    def load(cls, path: Path) -> SelectionCurves:
        meta, tensors = load_result(path, "selection")
        orders = [
            {name: [tuple(h) for h in order] for name, order in fold.items()} for fold in meta["orders"]
        ]
        return cls(tuple(meta["rankers"]), tuple(meta["ks"]), tensors["effect"], orders, meta["alpha"])


def rankings(
    vectors: DetoxVectors,
    causal: torch.Tensor,
    seeds: Sequence[int] = RANDOM_SEEDS,
    gradient: torch.Tensor | None = None,
) -> dict[str, Order]:
    """Head orders: probe accuracy, `causal` [n_layers, n_heads] (largest first), `gradient` (the
    first-order estimate of the same, where given) and random ones."""
    n_layers, n_heads = vectors.shape
    orders = {"probe": vectors.ranking(), "causal": rank_heads(causal)}
    if gradient is not None:
        orders["gradient"] = rank_heads(gradient)
    for seed in seeds:
        perm = torch.randperm(n_layers * n_heads, generator=torch.Generator().manual_seed(seed))
        orders[f"random-{seed}"] = [divmod(int(i), n_heads) for i in perm]
    return orders


def curve_ks(n_cells: int, ks: Sequence[int] = KS) -> tuple[int, ...]:
    """The k of the curve: those below the number of heads, then all heads."""
    return tuple(k for k in ks if k < n_cells) + (n_cells,)


def fold_pairs(pairs: SteeringPairs, n_folds: int = N_FOLDS) -> list[SteeringPairs]:
    """`pairs` cut into `n_folds` contiguous folds, in order (sizes differ by at most one)."""
    if not 2 <= n_folds <= len(pairs):
        raise DesteinError(f"cross-fitting needs 2 to {len(pairs)} folds, got {n_folds}")
    bounds = [round(i * len(pairs) / n_folds) for i in range(n_folds + 1)]
    return [
        SteeringPairs(pairs.toxic[a:b], pairs.nontoxic[a:b], f"{pairs.source} (fold {i + 1}/{n_folds})")
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def crossfit_orders(
    vectors: DetoxVectors,
    steering: HeadEffects,
    fold_sizes: Sequence[int],
    seeds: Sequence[int] = RANDOM_SEEDS,
    gradient: HeadEffects | None = None,
) -> list[dict[str, Order]]:
    """Per fold, the orders its curve uses: "causal" (and "gradient", the first-order estimate,
    where given) ranked on the other folds' pairs only."""
    starts = [sum(fold_sizes[:i]) for i in range(len(fold_sizes))]
    out = []
    for start, size in zip(starts, fold_sizes):
        others = torch.ones(steering.n_pairs, dtype=torch.bool)
        others[start : start + size] = False
        rest = None if gradient is None else gradient.values[..., others].mean(-1)
        out.append(rankings(vectors, steering.values[..., others].mean(-1), seeds, rest))
    return out


def selection_curves(
    model: TransformerBridge,
    vectors: DetoxVectors,
    folds: Sequence[HeldOut],
    orders: Sequence[dict[str, Order]],
    *,
    ks: Sequence[int] = KS,
    alpha: float = DEFAULT_STRENGTH,
    form: str = "destein",
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> SelectionCurves:
    """Steer each order's top k heads for every k of `curve_ks`, fold by fold with that fold's
    orders; the pairs come out in fold order. Identical head sets on a fold run once; under a
    launch each rank steers its share of the sets."""
    n_layers, n_heads = vectors.shape
    ks = curve_ks(n_layers * n_heads, ks)
    rankers = list(orders[0])
    ckpt = checkpoint or Checkpoint(None)
    keys: dict[tuple[int, int, int], str] = {}  # (fold, ranker, k index) -> the cell of its head set
    sets: dict[str, tuple[int, list[tuple[int, int]]]] = {}  # cell -> (fold, heads)
    for f, fold_orders in enumerate(orders):
        sets[f"{f}.base"] = (f, [])
        for r, i in itertools.product(range(len(rankers)), range(len(ks))):
            heads = sorted(fold_orders[rankers[r]][: ks[i]])
            keys[f, r, i] = f"{f}." + hashlib.sha256(repr(heads).encode()).hexdigest()[:16]
            sets[keys[f, r, i]] = (f, heads)
    todo = distributed.share([key for key in sets if key not in ckpt.cells])
    for key in tqdm(todo, desc="selection", unit="set", disable=not progress or not distributed.is_main()):
        f, heads = sets[key]
        ckpt.get_or_compute(
            key,
            lambda f=f, heads=heads: (
                (
                    steered_scores(model, vectors, folds[f], heads, alpha, form)
                    if heads
                    else score(model, folds[f])
                ).gap
            ),
        )
    ckpt.gather()
    effects = [
        torch.stack(
            [
                torch.stack([ckpt.cells[f"{f}.base"] - ckpt.cells[keys[f, r, i]] for i in range(len(ks))])
                for r in range(len(rankers))
            ]
        )
        for f in range(len(folds))
    ]
    return SelectionCurves(tuple(rankers), ks, torch.cat(effects, dim=-1), list(orders), float(alpha))


def selection_evaluation(
    model: TransformerBridge,
    vectors: DetoxVectors,
    orders: dict[str, Order],
    ks: Sequence[int],
    prompts: Sequence[Prompt],
    out_dir: Path,
    config: EvalConfig,
    *,
    alpha: float = DEFAULT_STRENGTH,
    form: str = "destein",
    extra_scorers: Sequence[Scorer] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """EMT, TP and perplexity of steering each order's top k (`<ranker>-top<k>`), and the baseline,
    with the evaluation harness (a resumable run folder of its own; `extra_scorers` as in
    `evaluate`); returns its metrics."""
    methods = [BASELINE] + [
        MethodSpec(f"{name}-top{k}", SteeringConfig(alpha=alpha, heads=orders[name][:k], form=form))
        for name in orders
        for k in ks
    ]
    return evaluate(
        model,
        prompts,
        methods,
        out_dir,
        config,
        vectors=vectors,
        extra_scorers=extra_scorers,
        progress=progress,
    )
