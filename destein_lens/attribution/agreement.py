"""Agreement between head rankings: Spearman's rho and top-k overlap, with bootstrap intervals.

The rankings are probe accuracy (what DeStein steers by, fixed: it comes from the vectors' own
pairs) and the per-pair studies (patching, DLA, steering, leave-one-out). The intervals resample
the held-out pairs jointly, the same draw for every study, so a correlation's interval reflects
how much the studies' head orders move when the pairs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import einops
import torch
from scipy.stats import rankdata
from transformer_lens.utilities.statistics import derive_generator

from ..errors import DesteinError
from ..store import load_result, save_result
from .effects import CONFIDENCE, N_RESAMPLES, HeadEffects


@dataclass(frozen=True, eq=False)
class Agreement:
    """Pairwise agreement of head rankings; every matrix is [n_rankings, n_rankings]."""

    rankings: tuple[str, ...]
    k: int  # the top-k of the overlap
    spearman: torch.Tensor
    spearman_low: torch.Tensor
    spearman_high: torch.Tensor
    overlap: torch.Tensor  # |top-k(a) & top-k(b)| / k
    overlap_low: torch.Tensor
    overlap_high: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.rankings)
        if n < 1:
            raise DesteinError("an agreement needs at least one ranking")
        for name in ("spearman", "spearman_low", "spearman_high", "overlap", "overlap_low", "overlap_high"):
            shape = tuple(getattr(self, name).shape)
            if shape != (n, n):
                raise DesteinError(f"{name} must be [{n}, {n}] for {n} rankings, got {list(shape)}")

    def save(self, path: Path) -> None:
        names = ("spearman", "spearman_low", "spearman_high", "overlap", "overlap_low", "overlap_high")
        tensors = {n: getattr(self, n) for n in names}
        save_result(path, "agreement", tensors, {"rankings": list(self.rankings), "k": self.k})

    @classmethod
    def load(cls, path: Path) -> Agreement:
        meta, tensors = load_result(path, "agreement")
        return cls(rankings=tuple(meta["rankings"]), k=meta["k"], **tensors)


def agreement(
    scores: dict[str, HeadEffects | torch.Tensor], *, k: int = 8, confidence: float = CONFIDENCE
) -> Agreement:
    """Agreement of the rankings by each score: a study's per-pair effects or a fixed [L, H] grid."""
    per_pair = [s.values for s in scores.values() if isinstance(s, HeadEffects)]
    if not per_pair:
        raise DesteinError("agreement needs at least one per-pair study")
    n_pairs = per_pair[0].shape[-1]
    if any(v.shape[-1] != n_pairs for v in per_pair):
        raise DesteinError("the studies were measured on different held-out pairs")
    n_cells = per_pair[0].shape[0] * per_pair[0].shape[1]
    if any(s.numel() != n_cells for s in scores.values() if not isinstance(s, HeadEffects)):
        raise DesteinError("a fixed score grid does not match the studies' heads")
    if not 1 <= k <= n_cells:
        raise DesteinError(f"top-k overlap needs 1 <= k <= {n_cells}, got {k}")
    draws = torch.randint(0, n_pairs, (N_RESAMPLES, n_pairs), generator=derive_generator(0, "agreement"))
    point, boot = [], []
    for s in scores.values():
        if isinstance(s, HeadEffects):
            flat = einops.rearrange(s.values, "l h p -> (l h) p")
            point.append(flat.mean(-1))
            boot.append(einops.rearrange(flat[:, draws].mean(-1), "c r -> r c"))
        else:
            point.append(s.flatten().float())
            boot.append(einops.repeat(s.flatten().float(), "c -> r c", r=N_RESAMPLES))
    rho, rho_boot = _spearman(torch.stack(point)[None]), _spearman(torch.stack(boot, dim=1))
    ov, ov_boot = _overlap(torch.stack(point)[None], k), _overlap(torch.stack(boot, dim=1), k)
    tail = (1 - confidence) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    # nanquantile: a resample whose ranking is constant has no rho; it should not void the interval
    rho_q, ov_q = torch.nanquantile(rho_boot, q, dim=0), torch.nanquantile(ov_boot, q, dim=0)
    return Agreement(
        rankings=tuple(scores),
        k=k,
        spearman=rho[0].float(),
        spearman_low=rho_q[0].float(),
        spearman_high=rho_q[1].float(),
        overlap=ov[0].float(),
        overlap_low=ov_q[0].float(),
        overlap_high=ov_q[1].float(),
    )


def _spearman(x: torch.Tensor) -> torch.Tensor:
    """[r, s, c] scores -> [r, s, s] rank correlations (average ranks for ties; NaN if constant)."""
    ranks = torch.from_numpy(rankdata(x.double().numpy(), axis=-1))
    centred = ranks - ranks.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1)  # 0 for a constant ranking: 0 / 0 = NaN, as scipy answers
    return einops.einsum(centred, centred, "r s c, r t c -> r s t") / (norm[:, :, None] * norm[:, None, :])


def _overlap(x: torch.Tensor, k: int) -> torch.Tensor:
    """[r, s, c] scores -> [r, s, s] share of top-k heads two rankings have in common.

    Ties are cut by `topk`; pass strict scores (as `study` does for the probe ranking) where the
    tie-break matters."""
    top = torch.zeros(x.shape, dtype=torch.float64)
    top.scatter_(-1, x.topk(k, dim=-1).indices, 1.0)
    return einops.einsum(top, top, "r s c, r t c -> r s t") / k
