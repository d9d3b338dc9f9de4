"""Per-head linear probes: which attention heads tell toxic from non-toxic text.

DeStein ranks heads by the held-out accuracy of a logistic-regression probe on each head's
activations and weights the steering by it. The released code fits one sklearn model per
head in a Python loop (720 fits for GPT2-large); here all heads are solved together in torch,
and the sklearn loop stays as the reference it must agree with. With more train rows than
features, heads take cheap majorisation steps first and only the few left over take exact
Newton steps; with fewer rows than features, Newton runs in kernel form on an n x n problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import einops
import torch
import torch.nn.functional as F

from destein_lens.errors import DesteinError

Method = Literal["torch", "sklearn"]

# Stop when every head's gradient max-norm, per training sample, is below this: ten times
# tighter than sklearn's lbfgs default (tol=1e-4 on the same per-sample-normalised gradient).
# (Kernel Newton tests the gradient's Euclidean norm, which is stricter still.)
_GRAD_TOL = 1e-5
# Regularised logistic Newton converges in well under 20 steps; the cap only bounds bad input.
_MAX_NEWTON_STEPS = 50
_MAX_HALVINGS = 30
_MAX_DOUBLINGS = 3
_ARMIJO = 1e-4
# float32 sums of ~1000 losses are only this exact (relative); line search must not chase noise.
_OBJ_SLACK = 1e-5
# Added to the Hessian diagonal only (the fixed point is unchanged): keeps Cholesky safe when
# a head's probabilities saturate and its intercept curvature sum(p(1-p)) vanishes.
_JITTER = 1e-6
_MIN_SPLIT_PAIRS = 2
# Majorisation steps every head takes before the heads still short of _GRAD_TOL switch to
# exact Newton: tuned at GPT2-large scale, where ~95% of heads are done by then; the few left
# converge too slowly under the fixed bound.
_MM_STEPS = 4
# Over-relaxation cap of the bound steps: any multiple below 2 of a majorisation step descends.
_MAX_RELAX = 1.9
# Per-chunk feature buffer of the torch solver: well under the L3 of current server cores, so
# a chunk's repeated passes stay in cache (8 MB measured fastest at GPT2-large scale).
_CHUNK_BYTES = 8 * 2**20
# Scratch for each Hessian product's weighted copy of X: small enough to stay in L2 and to be
# reused from the heap rather than freshly page-faulted every Newton step.
_SCRATCH_BYTES = 2 * 2**20


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
    path always centres, which changes no logit at the optimum). seed: the sklearn
    reference's random_state, as the released code passes it; neither lbfgs nor the torch
    solvers draw from it, so results do not depend on it.
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
    if method == "torch":
        # a NaN or inf activation makes its head's logits non-finite (centring spreads it over
        # the train rows), so the inputs are searched only then: a pass over them costs 4%
        logits = _fit_torch(acts.detach(), labels[:n_rows], l2, standardize)
    else:
        _check_finite(acts)
        # Unstandardised, the reference fits raw features, as the released code does: lbfgs
        # stops on a gradient tolerance, so even centring would change which heads it gets right.
        features = _features(acts.detach(), n_train, standardize)
        logits = _fit_sklearn(features, labels[:n_rows], l2, seed)
    if not torch.isfinite(logits).all():
        _check_finite(acts)
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


def _check_finite(acts: torch.Tensor) -> None:
    """Reject NaN or inf activations, which no probe can be fitted on."""
    # one cheap reduction; the elementwise pass only runs if the sum overflowed or is NaN
    if not torch.isfinite(acts.sum()) and not torch.isfinite(acts).all():
        raise DesteinError("probe activations contain NaN or inf")


def _features(acts: torch.Tensor, n_train: int, standardize: bool) -> torch.Tensor:
    """Per-head float32 features [L*H, 2*n_pairs, d_head]; rows are (pair, side), train first.

    The sklearn loop's input: every head's rows contiguous, as one model per head needs.
    """
    n_pairs, _, n_layers, n_heads, d_head = acts.shape
    features = torch.empty(n_layers * n_heads, 2 * n_pairs, d_head)
    features.copy_(einops.rearrange(acts, "p s l h d -> (l h) (p s) d"))
    if standardize:
        _standardise_(features, 2 * n_train)
    return features


def _standardise_(features: torch.Tensor, n_rows: int) -> None:
    """Centre and scale each head's features in place to zero mean and unit variance on its
    first n_rows (train) rows, as sklearn's StandardScaler fitted on the train split."""
    _centre_(features, n_rows)
    _scale_(features, _sum_squares(features[:, :n_rows]).div_(n_rows).sqrt_())


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-head column sums of squares [B, d] of x [B, n, d].

    Squared through a small reused scratch: `vector_norm` over this axis runs at a few GB/s,
    and squaring all of x at once allocates a copy as large as x.
    """
    n_batch, n_rows, n_features = x.shape
    per_block = max(1, _SCRATCH_BYTES // (4 * n_rows * n_features))
    scratch = x.new_empty(min(n_batch, per_block), n_rows, n_features)
    sums = x.new_empty(n_batch, n_features)
    for start in range(0, n_batch, per_block):
        block = x[start : start + per_block]
        squared = torch.mul(block, block, out=scratch[: len(block)])
        torch.sum(squared, dim=1, out=sums[start : start + per_block])
    return sums


def _centre_(features: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Subtract each head's train-row mean [B, d] in place; returns it."""
    mean = features[:, :n_rows].mean(dim=1)
    features.sub_(mean.unsqueeze(1))
    return mean


def _scale_(features: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Divide each head's features [B, n, d] by std [B, d] in place; returns the divisor."""
    std = torch.where(std > 0, std, 1.0)  # constant feature: as StandardScaler
    features.div_(std.unsqueeze(1))
    return std


def _fit_torch(acts: torch.Tensor, y: torch.Tensor, l2: float, standardize: bool) -> torch.Tensor:
    """Logits [L*H, rows] of every row, from all heads' probes fitted at once on the train rows
    (the first len(y), with labels y).

    Heads go through in chunks whose features fit in the L3 cache, copied into one reused
    buffer: every later pass over a chunk reads cache, not DRAM, and no ~200 MB feature
    tensor is ever allocated (building one took 0.1 s at GPT2-large scale). With more
    train rows than features, every head takes a few majorisation steps and the few still
    short of the tolerance (confidently separable heads) are reloaded together and finish
    with exact Newton; with fewer, Newton runs in kernel form.
    """
    x = einops.rearrange(acts.float(), "p s l h d -> (l h) (p s) d")  # a view, for float32 acts
    n_heads, n_all, d_head = x.shape
    n_rows = len(y)
    chunk = max(1, _CHUNK_BYTES // (4 * n_all * d_head))
    buffer = torch.empty(min(chunk, n_heads), n_all, d_head)
    logits = torch.empty(n_heads, n_all)

    def load(heads: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 0, heads, out=buffer[: len(heads)])

    if n_rows < d_head:
        for heads in torch.arange(n_heads).split(chunk):
            features = load(heads)
            if standardize:
                _standardise_(features, n_rows)
            else:
                _centre_(features, n_rows)
            logits[heads] = _kernel_newton(features, n_rows, y, l2)
        return logits

    coef = torch.empty(n_heads, d_head + 1)
    mean, std = torch.empty(n_heads, d_head), torch.empty(n_heads, d_head)
    unsolved = [torch.arange(0)]
    for heads in torch.arange(n_heads).split(chunk):
        features = load(heads)
        gram, mean[heads], std[heads] = _primal_setup_(features, n_rows, standardize)
        coef[heads], left = _majorise(features[:, :n_rows], gram, y, l2)
        logits[heads] = _apply(features, coef[heads, :-1]) + coef[heads, -1:]
        unsolved.append(heads[left])
    for heads in torch.cat(unsolved).split(chunk):
        # the same centring and scale as before, so the coefficients carry over exactly
        features = load(heads).sub_(mean[heads].unsqueeze(1)).div_(std[heads].unsqueeze(1))
        coef[heads] = _newton(features[:, :n_rows], y, l2, coef[heads])
        logits[heads] = _apply(features, coef[heads, :-1]) + coef[heads, -1:]
    return logits


def _primal_setup_(
    features: torch.Tensor, n_rows: int, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre (and, with `standardize`, scale) features in place, as `_standardise_` does;
    returns the Gram matrices [B, d, d] of the result's train rows, and the mean and scale
    [B, d] applied.

    Centring is always applied: with the intercept unpenalised it changes no logit at the
    optimum, and it decouples the intercept in `_majorise`'s bound. The scale comes from the
    Gram diagonal, which the solver needs anyway (a separate norm reduction costs more).
    """
    mean = _centre_(features, n_rows)
    train = features[:, :n_rows]
    gram = torch.bmm(train.transpose(1, 2), train)
    std = torch.ones_like(mean)
    if standardize:
        std = _scale_(features, (gram.diagonal(dim1=-2, dim2=-1) / n_rows).sqrt())
        gram.div_(std.unsqueeze(-1)).div_(std.unsqueeze(-2))
    return gram, mean, std


def _majorise(
    x: torch.Tensor, gram: torch.Tensor, y: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients [B, d+1] after _MM_STEPS majorisation steps from zero, and which heads
    are not yet within _GRAD_TOL. x: centred train features; gram: x^T x (overwritten).

    Logistic curvature never exceeds 1/4, so X^T X / 4 + l2 I bounds every head's Hessian
    everywhere: a step with it always descends, and so does any multiple of it below 2, so no
    line search is needed; the bound is factored once (the intercept decouples on centred x,
    with curvature n/4). Each step is over-relaxed by the bound's curvature over the curvature
    the last step met (a secant estimate, clipped to [1, _MAX_RELAX]), which is what the bound
    overstates where probabilities have moved away from 1/2. Each step is two cheap passes
    over x. Most heads converge in 3 or 4 steps; confidently separable ones do not.
    """
    n_rows, n_features = x.shape[1:]
    bound = gram.div_(4)
    bound.diagonal(dim1=-2, dim2=-1).add_(l2)
    chol, _ = torch.linalg.cholesky_ex(bound)
    weight = x.new_zeros(len(x), 1, n_features)
    bias = x.new_zeros(len(x), 1, 1)
    relax = torch.ones_like(bias)
    last = None  # the previous step's gradient, its intercept part, and its bound step
    rows = x.transpose(1, 2)
    for step in range(_MM_STEPS + 1):
        resid = torch.baddbmm(bias, weight, rows).sigmoid_().sub_(y)  # [B, 1, n]
        grad = torch.baddbmm(weight, resid, x, beta=l2)  # [B, 1, d], penalty included
        total = resid.sum(-1, keepdim=True)
        if step == _MM_STEPS:
            break
        if last is not None:  # that bound step was taken `relax` times over
            last_grad, last_total, d_weight, d_bias = last
            met = ((grad - last_grad) * d_weight).sum(-1, keepdim=True) + (total - last_total) * d_bias
            bounded = -(last_grad * d_weight).sum(-1, keepdim=True) - last_total * d_bias
            relax = (relax * bounded / met.clamp_min(1e-30)).clamp(1.0, _MAX_RELAX)
        d_weight = -torch.cholesky_solve(grad.transpose(1, 2), chol).transpose(1, 2)
        d_bias = -total / (n_rows / 4)
        weight += relax * d_weight
        bias += relax * d_bias
        last = grad, total, d_weight, d_bias
    left = torch.maximum(grad.abs().amax((1, 2)), total.abs().flatten()) > _GRAD_TOL * n_rows
    return torch.cat([weight, bias], -1).squeeze(1), left


def _apply(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight per head, [B, n], computed as [1, d] x [d, n]: MKL runs that shape several
    times faster than the [n, d] x [d, 1] it equals."""
    return torch.bmm(weight.unsqueeze(1), x.transpose(1, 2)).squeeze(1)


def _newton(x: torch.Tensor, y: torch.Tensor, l2: float, coef: torch.Tensor) -> torch.Tensor:
    """Coefficients [B, d+1] of B independent L2 logistic regressions, intercept last.

    Damped Newton (IRLS) from `coef`, with a per-head backtracking line search, so every head
    converges from any start without tuning. Converged heads leave the batch, so late steps
    cost a fraction of one.
    """
    n_rows, n_features = x.shape[1:]
    penalty = torch.full((n_features + 1,), l2)
    penalty[-1] = 0.0  # sklearn's lbfgs leaves the intercept unpenalised

    def objective(z: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return (F.softplus(z) - y * z).sum(-1) + 0.5 * (penalty * coef.square()).sum(-1)

    solved = torch.empty_like(coef)
    active = torch.arange(len(x))
    z = _apply(x, coef[:, :-1]) + coef[:, -1:]
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
        hessian = _hessians(x, prob * (1 - prob))
        hessian.diagonal(dim1=-2, dim2=-1).add_(penalty + _JITTER * n_rows)
        chol, _ = torch.linalg.cholesky_ex(hessian)
        step = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        dz = _apply(x, step[:, :-1]) + step[:, -1:]
        slope = (grad * step).sum(-1)
        (z, coef), obj = _line_search(objective, (z, coef), (dz, step), obj, slope)
    solved[active] = coef  # heads still active hit the step cap: keep their last iterate
    return solved


def _kernel_newton(x: torch.Tensor, n_rows: int, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Logits [B, rows] of every row, for heads with fewer train rows than features.

    The penalised optimum's weights lie in the span of the train rows, w = X^T a, so Newton
    runs on the n-dim a against the kernel K = X X^T, formed once: each step is one bordered
    (n+1)-dim solve, and the d-dim features are never read again. The stopping test takes the
    Euclidean norm of the feature gradient X^T (r + l2 a), sqrt(dual^T K dual), which bounds
    the max-norm the primal solver tests, so it is at least as strict. Converged heads leave
    the batch, so the last steps, which only a few heads need, cost a fraction of one.
    x: centred features, train rows first.
    """
    kernel = torch.bmm(x, x[:, :n_rows].transpose(1, 2))  # [B, rows, n]; its first n rows are K
    solved = x.new_zeros(len(x), n_rows + 1)  # a, then the intercept
    active = torch.arange(len(x))
    gram = kernel[:, :n_rows]
    alpha = x.new_zeros(len(x), n_rows)
    bias = x.new_zeros(len(x), 1)
    z = x.new_zeros(len(x), n_rows)

    def objective(z: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # |w|^2 = a^T K a, and K a = z - bias
        return (F.softplus(z) - y * z).sum(-1) + 0.5 * l2 * (alpha * (z - bias)).sum(-1)

    obj = objective(z, alpha, bias)
    # the bordered systems, built as their transposes, so the solver's column-major copy is a
    # plain one; the active heads use a leading slice
    systems_t = x.new_empty(len(x), n_rows + 1, n_rows + 1)
    for _ in range(_MAX_NEWTON_STEPS):
        prob = torch.sigmoid(z)
        resid = prob - y
        dual = resid + l2 * alpha
        total = resid.sum(-1, keepdim=True)
        # |X^T dual|^2; products with K (symmetric) are taken as [1, n] x [n, n], which MKL
        # runs several times faster than the [n, n] x [n, 1] it equals
        grad_sq = (torch.bmm(dual.unsqueeze(1), gram).squeeze(1) * dual).sum(-1)
        done = torch.maximum(grad_sq.clamp_min(0).sqrt(), total.abs().squeeze(-1)) <= _GRAD_TOL * n_rows
        if done.any():
            solved[active[done]] = torch.cat([alpha[done], bias[done]], -1)
            keep = ~done
            active, gram, alpha, bias, z, obj, prob, resid, dual, total = (
                t[keep] for t in (active, gram, alpha, bias, z, obj, prob, resid, dual, total)
            )
            if not len(active):
                break
        # Newton in (w, b) with w = X^T a reduces to [[S K + l2 I, s], [s^T K, sum s]]
        weight = prob * (1 - prob)
        system_t = systems_t[: len(active)]
        torch.mul(gram, weight.unsqueeze(-2), out=system_t[:, :-1, :-1])
        system_t[:, :-1, :-1].diagonal(dim1=-2, dim2=-1).add_(l2)
        system_t[:, -1, :-1] = weight
        system_t[:, :-1, -1] = torch.bmm(weight.unsqueeze(1), gram).squeeze(1)
        system_t[:, -1, -1] = weight.sum(-1) + _JITTER * n_rows
        step = torch.linalg.solve_ex(system_t.mT, -torch.cat([dual, total], -1))[0]
        d_alpha, d_bias = step[:, :-1].contiguous(), step[:, -1:]
        dz = torch.bmm(d_alpha.unsqueeze(1), gram).squeeze(1) + d_bias
        slope = (resid * dz).sum(-1) + l2 * (d_alpha * (z - bias)).sum(-1)
        (z, alpha, bias), obj = _line_search(objective, (z, alpha, bias), (dz, d_alpha, d_bias), obj, slope)
    else:  # heads still active hit the step cap: keep their last iterate
        solved[active] = torch.cat([alpha, bias], -1)
    return torch.bmm(solved[:, None, :-1], kernel.transpose(1, 2)).squeeze(1) + solved[:, -1:]


def _line_search(
    objective: Callable[..., torch.Tensor],
    point: tuple[torch.Tensor, ...],
    direction: tuple[torch.Tensor, ...],
    obj: torch.Tensor,
    slope: torch.Tensor,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Per-head step along `direction`: the point moved there, and the objective [B] there.

    The step size t is halved from 1 until the objective drops enough (Armijo); where the
    full step already does, it is doubled while the objective keeps dropping by more than
    float32 noise. Far from the optimum of a (nearly) separable head, margins grow faster
    than a Newton step predicts, and the doubling saves whole steps; near it, the full
    Newton step is best and is kept. Every tensor of `point` and `direction` is [B, ...];
    obj is the objective at `point`, slope its derivative along `direction`.
    """

    def moved(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p + t * d for p, d in zip(point, direction, strict=True))

    t = obj.new_ones(len(obj), 1)
    trial = objective(*moved(t))
    for _ in range(_MAX_HALVINGS):
        ok = trial <= obj + _ARMIJO * t.squeeze(-1) * slope + _OBJ_SLACK * obj.abs()
        if ok.all():
            break
        t = torch.where(ok.unsqueeze(-1), t, t / 2)
        trial = objective(*moved(t))
    growing = t.squeeze(-1) == 1
    for _ in range(_MAX_DOUBLINGS):
        if not growing.any():
            break
        longer = torch.where(growing.unsqueeze(-1), 2 * t, t)
        further = objective(*moved(longer))
        growing &= further < trial - _OBJ_SLACK * obj.abs()
        t = torch.where(growing.unsqueeze(-1), longer, t)
        trial = torch.where(growing, further, trial)
    return moved(t), trial


def _hessians(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Unpenalised log-loss Hessians [B, d+1, d+1], intercept last.

    The X^T diag(weight) X block is chunked over heads so the weighted copy of X lives in one
    small reused buffer: a fresh full-size copy every Newton step costs as much as the
    product. The intercept's row and column need no column of ones in X.
    """
    n_batch, n_rows, n_features = x.shape
    per_product = max(1, _SCRATCH_BYTES // (4 * n_rows * n_features))
    block = x.new_empty(n_batch, n_features, n_features)
    scratch = x.new_empty(min(n_batch, per_product), n_rows, n_features)
    for start in range(0, n_batch, per_product):
        heads = slice(start, start + per_product)
        scaled = torch.mul(x[heads], weight[heads].unsqueeze(-1), out=scratch[: len(block[heads])])
        torch.bmm(x[heads].transpose(1, 2), scaled, out=block[heads])
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
