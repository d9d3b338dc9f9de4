"""Per-head linear probes: which attention heads tell toxic from non-toxic text.

DeStein ranks heads by the held-out accuracy of a logistic-regression probe on each head's
activations and weights the steering by it. The released code fits one sklearn model per head
in a Python loop (720 fits for GPT2-large); that loop stays as the reference (method="sklearn").
The default fits all heads at once in torch by batched Newton (IRLS) on the objective of
sklearn's LogisticRegression(C=1/l2), so both reach the same optimum: one Cholesky per head per
step, and a halving line search. With fewer train rows than features (the 50 built-in pairs
give 80 train rows against gemma's d_head of 256), Newton runs in kernel form, on n x n systems
instead of d x d. Probes take well under a second of a minutes-long run, so the solver is kept
short rather than tuned; benchmarks/README.md has its speed against the sklearn loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import einops
import torch
import torch.nn.functional as F

from destein_lens.errors import DesteinError

Method = Literal["torch", "sklearn"]

_MIN_SPLIT_PAIRS = 2
# Stop when every head's gradient max-norm, per training sample, is below this: ten times
# tighter than sklearn's lbfgs default (tol=1e-4 on the same per-sample-normalised gradient).
_GRAD_TOL = 1e-5
# Regularised logistic Newton converges in well under 20 steps; the cap only bounds bad input.
_MAX_NEWTON_STEPS = 50
_MAX_HALVINGS = 30
_ARMIJO = 1e-4
# float32 sums of ~1000 losses are only this exact (relative); the line search must not chase noise.
_OBJ_SLACK = 1e-5
# Added to the intercept's curvature in each step (the optimum is unchanged): keeps the step
# finite when a head's probabilities saturate and that curvature, sum(p(1-p)), vanishes.
_JITTER = 1e-6


@dataclass(frozen=True, eq=False)  # holds tensors: `==` on them is elementwise, so identity it is
class ProbeResult:
    """Held-out probe accuracy per head, plus what was needed to reproduce it.

    The head ranking built on it is `DetoxVectors.ranking()` (ties broken by direction norm).
    """

    accuracy: torch.Tensor  # [n_layers, n_heads], held-out pairs
    train_accuracy: torch.Tensor  # [n_layers, n_heads], train pairs
    # The probes themselves, on raw activations (standardisation folded in), so they can be
    # applied to a head's output anywhere: toxic logit = weight . x + bias.
    weight: torch.Tensor  # [n_layers, n_heads, d_head]
    bias: torch.Tensor  # [n_layers, n_heads]
    method: str
    train_frac: float
    n_train_pairs: int
    n_test_pairs: int


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
    path always centres, which changes no logit at the optimum). seed: the sklearn
    reference's random_state, as the released code passes it; neither lbfgs nor Newton draws
    from it, so results do not depend on it.
    """
    _check_acts(acts)
    if method not in ("torch", "sklearn"):
        raise DesteinError(f"unknown probe method {method!r}; use 'torch' or 'sklearn'")
    if not l2 > 0.0:
        raise DesteinError(f"l2 must be positive (sklearn's C = 1 / l2), got {l2}")
    n_pairs, _, n_layers, n_heads, _ = acts.shape
    n_train = train_pair_count(n_pairs, train_frac)
    labels = torch.tensor([1.0, 0.0]).repeat(n_pairs)  # rows are (pair, side): toxic first
    n_rows = 2 * n_train
    # The torch solver always centres: with the intercept unpenalised that changes no logit at
    # the optimum, and it keeps float32 systems well conditioned. Unstandardised, the reference
    # fits raw features, as the released code does: lbfgs stops on a gradient tolerance, so
    # even centring would change which heads it gets right.
    features, mean, scale = _features(
        acts.detach(), n_rows, centre=standardize or method == "torch", scale=standardize
    )
    fit = _fit_torch if method == "torch" else lambda f, y, l2: _fit_sklearn(f, y, l2, seed)
    logits, weight, bias = fit(features, labels[:n_rows], l2)
    if not torch.isfinite(logits).all():
        raise DesteinError("probe fit overflowed float32: activations this large need standardize=True")

    hits = einops.rearrange(
        ((logits > 0).float() == labels).float(), "(l h) rows -> l h rows", l=n_layers, h=n_heads
    )
    raw_weight = weight / scale.squeeze(1)  # undo the standardisation: w . (x - mean) / scale
    raw_bias = bias.squeeze(-1) - (raw_weight * mean.squeeze(1)).sum(-1)
    return ProbeResult(
        accuracy=hits[..., n_rows:].mean(dim=-1),
        train_accuracy=hits[..., :n_rows].mean(dim=-1),
        weight=einops.rearrange(raw_weight, "(l h) d -> l h d", l=n_layers),
        bias=einops.rearrange(raw_bias, "(l h) -> l h", l=n_layers),
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


def _features(
    acts: torch.Tensor, n_rows: int, *, centre: bool, scale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head float32 features [L*H, 2*n_pairs, d_head]; rows are (pair, side), train first.
    Also the mean subtracted and the scale divided by, [L*H, 1, d_head] each.

    centre / scale: to zero mean / unit variance on the first n_rows (train) rows, per head
    and feature, as sklearn's StandardScaler fitted on the train split. One fresh copy,
    transformed in place: the caller's activations are never touched.
    """
    n_pairs, _, n_layers, n_heads, d_head = acts.shape
    features = torch.empty(n_layers * n_heads, 2 * n_pairs, d_head)
    features.copy_(einops.rearrange(acts, "p s l h d -> (l h) (p s) d"))
    # one cheap reduction; the elementwise pass (30x slower) only runs if the sum is not finite
    if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():
        raise DesteinError("probe activations contain NaN or inf")
    train = features[:, :n_rows]  # a view: it follows the in-place updates
    mean = train.mean(dim=1, keepdim=True) if centre else features.new_zeros(features.shape[0], 1, d_head)
    features.sub_(mean)
    std = train.square().mean(dim=1, keepdim=True).sqrt_() if scale else torch.ones_like(mean)
    std = torch.where(std > 0, std, 1.0)  # constant feature: as StandardScaler
    features.div_(std)
    return features, mean, std


def _fit_torch(features: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, ...]:
    """Logits [B, rows] of every row, weights [B, d] and intercepts [B, 1], from all heads'
    probes fitted at once on the train rows (the first len(y), labels y; centred features)."""
    weight, bias = _newton(features[:, : len(y)], y, l2)
    return (features @ weight.unsqueeze(-1)).squeeze(-1) + bias, weight, bias


def _newton(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [B, d] and intercepts [B, 1] of B independent L2 logistic regressions on the
    centred train features x [B, n, d], the intercept unpenalised, as sklearn's.

    Damped Newton (IRLS) from zero, with a per-head halving (Armijo) line search, so every
    head converges, separable ones included, without tuning. With fewer rows than features
    the optimum's weights lie in the span of the rows, w = X^T a (representer theorem), so
    Newton runs on the n-dim a, in kernel form, with n x n systems instead of d x d. A head
    within tolerance stops moving, so its result does not depend on the rest of the batch.
    """
    n_batch, n_rows, n_features = x.shape
    kernel = x @ x.mT if n_rows < n_features else None  # K = X X^T
    # The state: coefficients theta (w, or a in kernel form), intercepts, train logits z, and
    # p_theta with |w|^2 = theta . p_theta: p_theta = w, or K a = z - bias in kernel form.
    theta = x.new_zeros(n_batch, n_features if kernel is None else n_rows)
    bias = x.new_zeros(n_batch, 1)
    z = x.new_zeros(n_batch, n_rows)
    p_theta = theta if kernel is None else torch.zeros_like(z)

    def objective(theta: torch.Tensor, p_theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (F.softplus(z) - y * z).sum(-1) + 0.5 * l2 * (theta * p_theta).sum(-1)

    obj = objective(theta, p_theta, z)
    for _ in range(_MAX_NEWTON_STEPS):
        prob = torch.sigmoid(z)
        resid = prob - y
        total = resid.sum(-1, keepdim=True)  # the intercept's gradient
        # the weights' gradient is X^T resid + l2 w, in kernel form X^T (resid + l2 a)
        dual = resid if kernel is None else resid + l2 * theta
        grad = (dual.unsqueeze(1) @ x).squeeze(1) + (l2 * theta if kernel is None else 0.0)
        moving = torch.maximum(grad.abs().amax(-1), total.abs().squeeze(-1)) > _GRAD_TOL * n_rows
        if not moving.any():
            break
        # Newton's equations for the step (d_theta, d_bias), with s = p(1 - p), S = diag(s):
        #   A d_theta + c d_bias = -g  and  s . dz + sum(s) d_bias = -total,  with dz = X dw;
        # primal: A = X^T S X + l2 I, c = X^T s, g = grad; kernel: A = S K + l2 I, c = s, g = dual.
        # Solving A for -g and for c at once gives d_theta and dz linear in d_bias, which the
        # intercept's equation then fixes.
        curv = prob * (1 - prob)
        if kernel is None:
            rhs = torch.stack([-grad, (curv.unsqueeze(1) @ x).squeeze(1)], dim=-1)
            solved, moved = _primal_solve(x, curv, rhs, l2)
        else:
            solved, moved = _kernel_solve(kernel, curv, torch.stack([-dual, curv], dim=-1), l2)
        coupling = (curv.unsqueeze(-1) * moved).sum(1)  # s . dz of both solutions
        schur = curv.sum(-1, keepdim=True) - coupling[:, 1:] + _JITTER * n_rows
        d_bias = (-total - coupling[:, :1]) / schur
        d_theta = solved[..., 0] - solved[..., 1] * d_bias
        dz_weights = moved[..., 0] - moved[..., 1] * d_bias
        p_step = d_theta if kernel is None else dz_weights
        dz = dz_weights + d_bias
        slope = (resid * dz).sum(-1) + l2 * (d_theta * p_theta).sum(-1)
        t = moving.to(x.dtype).unsqueeze(-1)  # converged heads stay put
        trial = objective(theta + t * d_theta, p_theta + t * p_step, z + t * dz)
        for _ in range(_MAX_HALVINGS):
            ok = trial <= obj + _ARMIJO * t.squeeze(-1) * slope + _OBJ_SLACK * obj.abs()
            if ok.all():
                break
            t = torch.where(ok.unsqueeze(-1), t, t / 2)
            trial = objective(theta + t * d_theta, p_theta + t * p_step, z + t * dz)
        theta, bias, z, p_theta = theta + t * d_theta, bias + t * d_bias, z + t * dz, p_theta + t * p_step
        obj = trial
    weight = theta if kernel is None else (theta.unsqueeze(1) @ x).squeeze(1)
    return weight, bias


def _primal_solve(
    x: torch.Tensor, curv: torch.Tensor, rhs: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^-1 rhs and X A^-1 rhs, with A = X^T S X + l2 I: one Cholesky per head."""
    system = x.mT @ (x * curv.unsqueeze(-1))
    system.diagonal(dim1=-2, dim2=-1).add_(l2)
    solved = torch.cholesky_solve(rhs, torch.linalg.cholesky_ex(system)[0])
    return solved, x @ solved


def _kernel_solve(
    kernel: torch.Tensor, curv: torch.Tensor, rhs: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A^-1 rhs and K A^-1 rhs, with A = S K + l2 I: one Cholesky per head.

    A is not symmetric, but A^-1 = (I - S^1/2 M^-1 S^1/2 K) / l2 with the symmetric positive
    definite M = S^1/2 K S^1/2 + l2 I (multiply out A (I - S^1/2 M^-1 S^1/2 K)).
    """
    root = curv.sqrt().unsqueeze(-1)
    system = root * kernel * root.mT
    system.diagonal(dim1=-2, dim2=-1).add_(l2)
    chol, _ = torch.linalg.cholesky_ex(system)
    solved = (rhs - root * torch.cholesky_solve(root * (kernel @ rhs), chol)) / l2
    return solved, kernel @ solved


def _fit_sklearn(features: torch.Tensor, y: torch.Tensor, l2: float, seed: int) -> tuple[torch.Tensor, ...]:
    """The released code's loop: one default-solver (lbfgs) LogisticRegression per head."""
    # imported here: only the reference path needs sklearn
    from sklearn.linear_model import LogisticRegression

    logits, weights, biases = [], [], []
    for head in features.numpy():
        clf = LogisticRegression(C=1.0 / l2, max_iter=1000, random_state=seed)
        clf.fit(head[: len(y)], y.numpy())
        # classes_ is [0, 1]: a positive decision means toxic, as in the torch path
        logits.append(torch.from_numpy(clf.decision_function(head)))
        weights.append(torch.from_numpy(clf.coef_[0]).float())
        biases.append(torch.from_numpy(clf.intercept_).float())
    return torch.stack(logits), torch.stack(weights), torch.stack(biases)
