"""Per-head linear probes: which attention heads tell toxic from non-toxic text.

DeStein ranks heads by the held-out accuracy of a logistic-regression probe on each head's
activations and weights the steering by it. The released code fits one sklearn model per
head in a Python loop (720 fits for GPT2-large); here all heads are one batch of independent
Newton problems in torch, and the sklearn loop stays as the reference it must agree with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import einops
import torch
import torch.nn.functional as F

from destein_lens.errors import DesteinError

Method = Literal["torch", "sklearn"]

# Stop when every head's gradient max-norm, per training sample, is below this: ten times
# tighter than sklearn's lbfgs default (tol=1e-4 on the same per-sample-normalised gradient).
_GRAD_TOL = 1e-5
# Regularised logistic Newton converges in well under 20 steps; the cap only bounds bad input.
_MAX_NEWTON_STEPS = 50
_MAX_HALVINGS = 30
_ARMIJO = 1e-4
# float32 sums of ~1000 losses are only this exact (relative); line search must not chase noise.
_OBJ_SLACK = 1e-5
# Added to the Hessian diagonal only (the fixed point is unchanged): keeps Cholesky safe when
# a head's probabilities saturate and its intercept curvature sum(p(1-p)) vanishes.
_JITTER = 1e-6
_MIN_SPLIT_PAIRS = 2
# Heads per Hessian product: the weighted copy of X stays a few MB and cache-warm.
_HESSIAN_CHUNK = 64


@dataclass(frozen=True)
class ProbeResult:
    """Held-out probe accuracy per head, plus what was needed to reproduce it."""

    accuracy: torch.Tensor  # [n_layers, n_heads], held-out pairs
    train_accuracy: torch.Tensor  # [n_layers, n_heads], train pairs; breaks ranking ties
    method: str
    train_frac: float
    n_train_pairs: int
    n_test_pairs: int

    def ranking(self) -> list[tuple[int, int]]:
        """All (layer, head), best held-out accuracy first.

        Accuracies are counts over the same test set, so ties are common; breaking them by
        train accuracy, then by index, keeps the top-k selection deterministic.
        """
        n_heads = self.accuracy.shape[1]
        test = self.accuracy.flatten().tolist()
        train = self.train_accuracy.flatten().tolist()
        order = sorted(range(len(test)), key=lambda i: (-test[i], -train[i], i))
        return [divmod(i, n_heads) for i in order]

    def top_k(self, k: int) -> list[tuple[int, int]]:
        """The k heads to steer."""
        total = self.accuracy.numel()
        if not 0 <= k <= total:
            raise DesteinError(f"top-k heads: k must be between 0 and {total}, got {k}")
        return self.ranking()[:k]

    def mask(self, k: int) -> torch.Tensor:
        """Bool [n_layers, n_heads], True on the top-k heads."""
        mask = torch.zeros(self.accuracy.shape, dtype=torch.bool)
        for layer, head in self.top_k(k):
            mask[layer, head] = True
        return mask


def train_pair_count(n_pairs: int, train_frac: float) -> int:
    """How many leading pairs train; the rest test (the released code's int(n * 0.8) split).

    Splitting whole pairs keeps a text and its paraphrase on the same side of the split, so
    held-out accuracy is never inflated by a near-duplicate seen in training.
    """
    if not 0.0 < train_frac < 1.0:
        raise DesteinError(f"train_frac must be strictly between 0 and 1, got {train_frac}")
    n_train = int(n_pairs * train_frac)
    if n_train < _MIN_SPLIT_PAIRS or n_pairs - n_train < _MIN_SPLIT_PAIRS:
        raise DesteinError(
            f"{n_pairs} pairs with train_frac={train_frac} gives {n_train} train and "
            f"{n_pairs - n_train} test pairs; probes need at least {_MIN_SPLIT_PAIRS} of each"
        )
    return n_train


def fit_probes(
    acts: torch.Tensor,
    *,
    method: Method = "torch",
    train_frac: float = 0.8,
    l2: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """Fit one L2 logistic-regression probe per head and score it on held-out pairs.

    acts: [n_pairs, 2, n_layers, n_heads, d_head]; side 0 is toxic (label 1), side 1 its
    non-toxic paraphrase (label 0). The objective is sum(log-loss) + l2/2 * |w|^2 with the
    intercept unpenalised, i.e. sklearn's C = 1 / l2 (l2=1 is the released code's default).
    standardize: scale each feature to unit variance on the train rows, per head (the torch
    path always centres, which changes no logit at the optimum). seed: the sklearn reference's random_state, as the
    released code passes it; neither lbfgs nor the Newton solver draws from it, so results
    do not depend on it.
    """
    _check_acts(acts)
    if method not in ("torch", "sklearn"):
        raise DesteinError(f"unknown probe method {method!r}; use 'torch' or 'sklearn'")
    if not l2 > 0.0:
        raise DesteinError(f"l2 must be positive (sklearn's C = 1 / l2), got {l2}")
    n_pairs, _, n_layers, n_heads, _ = acts.shape
    n_train = train_pair_count(n_pairs, train_frac)
    # The sklearn reference on raw features mirrors the released code exactly (lbfgs stops on
    # a gradient tolerance, so even centring would change which heads it gets right).
    features = _features(acts.detach(), n_train, standardize, center=standardize or method == "torch")
    labels = torch.tensor([1.0, 0.0]).repeat(n_pairs)  # rows are (pair, side): toxic first
    n_rows = 2 * n_train
    if method == "torch":
        logits = _fit_torch(features, labels[:n_rows], l2)
    else:
        logits = _fit_sklearn(features, labels[:n_rows], l2, seed)
    if not torch.isfinite(logits).all():
        raise DesteinError("probe fit overflowed float32: activations this large need standardize=True")

    hits = einops.rearrange(
        ((logits > 0).float() == labels).float(), "(l h) rows -> l h rows", l=n_layers, h=n_heads
    )
    return ProbeResult(
        accuracy=hits[..., n_rows:].mean(dim=-1),
        train_accuracy=hits[..., :n_rows].mean(dim=-1),
        method=method,
        train_frac=train_frac,
        n_train_pairs=n_train,
        n_test_pairs=n_pairs - n_train,
    )


def _check_acts(acts: torch.Tensor) -> None:
    """Reject what would otherwise fail deep inside a solver, or silently give junk."""
    if not isinstance(acts, torch.Tensor) or acts.ndim != 5 or acts.shape[1] != 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise DesteinError(f"probe activations must be [n_pairs, 2, n_layers, n_heads, d_head], got {shape}")
    if not acts.is_floating_point():
        raise DesteinError(f"probe activations must be floating point, got {acts.dtype}")
    if acts.numel() == 0:
        raise DesteinError(f"probe activations are empty: shape {tuple(acts.shape)}")
    # one cheap reduction; the elementwise pass only runs if the sum overflowed or is NaN
    if not torch.isfinite(acts.sum()) and not torch.isfinite(acts).all():
        raise DesteinError("probe activations contain NaN or inf")


def _features(acts: torch.Tensor, n_train: int, standardize: bool, center: bool) -> torch.Tensor:
    """Per-head float32 features [L*H, 2*n_pairs, d_head]; rows are (pair, side), train first.

    Centred on the train mean (`center`): with the intercept unpenalised that only shifts the
    intercept (no logit changes) and keeps float32 Newton well conditioned. At research scale
    this is ~200 MB, built in one allocation and transformed in place: fresh tensors that
    size cost more (page faults) than the arithmetic done on them.
    """
    n_pairs, _, n_layers, n_heads, d_head = acts.shape
    features = torch.empty(n_layers * n_heads, 2 * n_pairs, d_head)
    features.copy_(einops.rearrange(acts, "p s l h d -> (l h) (p s) d"))
    train = features[:, : 2 * n_train]
    if center:
        features.sub_(train.mean(dim=1, keepdim=True))
    if standardize:
        std = torch.linalg.vector_norm(train, dim=1, keepdim=True) / math.sqrt(2 * n_train)
        features.div_(torch.where(std > 0, std, 1.0))  # constant feature: as StandardScaler
    return features


def _fit_torch(features: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Logits [B, rows] of every row, from all heads' probes fitted at once on the train rows."""
    coef = _newton(features[:, : len(y)], y, l2)
    return _apply(features, coef[:, :-1]) + coef[:, -1:]


def _apply(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight per head, [B, n], computed as [1, d] x [d, n]: MKL runs that shape several
    times faster than the [n, d] x [d, 1] it equals."""
    return torch.bmm(weight.unsqueeze(1), x.transpose(1, 2)).squeeze(1)


def _newton(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Coefficients [B, d+1] of B independent L2 logistic regressions, intercept last.

    Damped Newton (IRLS) with a per-head backtracking line search, so every head converges
    from zero without tuning. The step is solved in whichever space is smaller: the
    (d+1)-dim primal, or, with fewer rows than features, the n-dim dual (Woodbury).
    Converged heads leave the batch: noise heads settle in ~3 steps, separable ones take ~5,
    so late steps cost a fraction of one.
    """
    n_rows, n_features = x.shape[1:]
    penalty = torch.full((n_features + 1,), l2)
    penalty[-1] = 0.0  # sklearn's lbfgs leaves the intercept unpenalised

    def objective(z: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return (F.softplus(z) - y * z).sum(-1) + 0.5 * (penalty * coef.square()).sum(-1)

    solved = x.new_zeros(len(x), n_features + 1)
    active = torch.arange(len(x))
    coef = torch.zeros_like(solved)
    z = x.new_zeros(len(x), n_rows)
    obj = objective(z, coef)
    for _ in range(_MAX_NEWTON_STEPS):
        prob = torch.sigmoid(z)
        resid = prob - y
        grad = (
            torch.cat([torch.bmm(resid.unsqueeze(1), x).squeeze(1), resid.sum(-1, keepdim=True)], dim=-1)
            + penalty * coef
        )
        done = grad.abs().amax(-1) <= _GRAD_TOL * n_rows
        if done.any():
            solved[active[done]] = coef[done]
            keep = ~done
            active, x, coef, z, obj, prob, grad = (t[keep] for t in (active, x, coef, z, obj, prob, grad))
            if not len(active):
                break
        if n_rows < n_features:
            step = _dual_step(x, prob * (1 - prob), grad, l2)
        else:
            step = _primal_step(x, prob * (1 - prob), grad, penalty)
        dz = _apply(x, step[:, :-1]) + step[:, -1:]
        slope = (grad * step).sum(-1)
        t = torch.ones(len(active), 1)
        trial_obj = objective(z + dz, coef + step)
        for _ in range(_MAX_HALVINGS):
            ok = trial_obj <= obj + _ARMIJO * t.squeeze(-1) * slope + _OBJ_SLACK * obj.abs()
            if ok.all():
                break
            t = torch.where(ok.unsqueeze(-1), t, t / 2)
            trial_obj = objective(z + t * dz, coef + t * step)
        coef, z, obj = coef + t * step, z + t * dz, trial_obj
    solved[active] = coef  # heads still active hit the step cap: keep their last iterate
    return solved


def _primal_step(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Newton step [B, d+1] from a batched Cholesky solve of the [B, d+1, d+1] Hessians."""
    hessian = _hessians(x, weight)
    hessian.diagonal(dim1=-2, dim2=-1).add_(penalty + _JITTER * x.shape[1])
    return -_cholesky_solve(hessian, grad.unsqueeze(-1)).squeeze(-1)


def _dual_step(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, l2: float) -> torch.Tensor:
    """The same Newton step for n < d, at O(n^2 d + n^3) per head instead of O(n d^2 + d^3).

    The feature block M = X^T S X + l2 I is inverted with Woodbury through the n x n matrix
    A = l2 I + S^1/2 X X^T S^1/2 (positive definite whatever the rank of X):
    M^-1 v = (v - X^T S^1/2 A^-1 S^1/2 X v) / l2. The intercept joins by block elimination
    (its Schur complement), so no (d+1)-dim matrix is ever formed.
    """
    root = weight.sqrt().unsqueeze(-1)  # [B, n, 1]
    inner = torch.bmm(x, x.transpose(1, 2)) * root * root.transpose(1, 2)
    inner.diagonal(dim1=-2, dim2=-1).add_(l2)
    cross = torch.bmm(weight.unsqueeze(1), x).squeeze(1)  # X^T s: couples weights and intercept
    rhs = torch.stack([grad[:, :-1], cross], dim=-1)  # [B, d, 2]
    through = _cholesky_solve(inner, torch.bmm(x, rhs) * root) * root
    inv_grad, inv_cross = ((rhs - torch.bmm(x.transpose(1, 2), through)) / l2).unbind(-1)
    schur = (weight.sum(-1) - (cross * inv_cross).sum(-1)).clamp_min(0.0) + _JITTER * x.shape[1]
    step_bias = (grad[:, -1] - (cross * inv_grad).sum(-1)) / schur
    step_weights = inv_grad - inv_cross * step_bias.unsqueeze(-1)
    return -torch.cat([step_weights, step_bias.unsqueeze(-1)], dim=-1)


def _cholesky_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix^-1 rhs for a batch of symmetric positive definite matrices."""
    chol, _ = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_solve(rhs, chol)


def _hessians(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Unpenalised log-loss Hessians [B, d+1, d+1], intercept last.

    The X^T diag(weight) X block is chunked over heads so the weighted copy of X lives in one
    small reused buffer: a fresh full-size copy every Newton step costs as much as the
    product. The intercept's row and column need no column of ones in X.
    """
    n_batch, _, n_features = x.shape
    block = x.new_empty(n_batch, n_features, n_features)
    scratch = x.new_empty(min(n_batch, _HESSIAN_CHUNK), *x.shape[1:])
    for start in range(0, n_batch, _HESSIAN_CHUNK):
        part = x[start : start + _HESSIAN_CHUNK]
        scaled = torch.mul(
            part, weight[start : start + _HESSIAN_CHUNK].unsqueeze(-1), out=scratch[: len(part)]
        )
        torch.bmm(part.transpose(1, 2), scaled, out=block[start : start + _HESSIAN_CHUNK])
    cross = torch.bmm(weight.unsqueeze(1), x).squeeze(1)
    hessian = x.new_empty(n_batch, n_features + 1, n_features + 1)
    hessian[:, :-1, :-1] = block
    hessian[:, :-1, -1] = cross
    hessian[:, -1, :-1] = cross
    hessian[:, -1, -1] = weight.sum(-1)
    return hessian


def _fit_sklearn(features: torch.Tensor, y: torch.Tensor, l2: float, seed: int) -> torch.Tensor:
    """The released code's loop: one default-solver (lbfgs) LogisticRegression per head."""
    # imported here: only the reference path needs sklearn
    from sklearn.linear_model import LogisticRegression

    logits = []
    for head in features.numpy():
        clf = LogisticRegression(C=1.0 / l2, max_iter=1000, random_state=seed)
        clf.fit(head[: len(y)], y.numpy())
        # classes_ is [0, 1]: a positive decision means toxic, as in the torch path
        logits.append(torch.from_numpy(clf.decision_function(head)))
    return torch.stack(logits)
