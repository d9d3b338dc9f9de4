"""Per-head probes: planted heads win, torch agrees with the sklearn reference, splits are by pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from destein_lens.errors import DesteinError
from destein_lens.probes import ProbeResult, _features, _fit_torch, fit_probes, train_pair_count

PLANTED = [(0, 1), (2, 3)]


def planted_acts(n_pairs: int, d_head: int, *, shift: float = 8.0) -> torch.Tensor:
    """[n_pairs, 2, 3 layers, 4 heads, d]: PLANTED heads separate toxic from non-toxic along one direction,
    every other head is pure noise. Pairs share a content vector, as paraphrases do."""
    gen = torch.Generator().manual_seed(1234)
    content = torch.randn(n_pairs, 1, 3, 4, d_head, generator=gen)
    acts = content + torch.randn(n_pairs, 2, 3, 4, d_head, generator=gen)
    for layer, head in PLANTED:
        direction = torch.nn.functional.normalize(torch.randn(d_head, generator=gen), dim=0)
        acts[:, 0, layer, head] += shift / 2 * direction
        acts[:, 1, layer, head] -= shift / 2 * direction
    return acts


def noise_mask(result: ProbeResult) -> torch.Tensor:
    mask = torch.ones_like(result.accuracy, dtype=torch.bool)
    for layer, head in PLANTED:
        mask[layer, head] = False
    return mask


def planted_beat_noise(result: ProbeResult) -> bool:
    """Every planted head's held-out accuracy is above every noise head's: they rank first."""
    planted = torch.stack([result.accuracy[layer, head] for layer, head in PLANTED])
    return bool(planted.min() > result.accuracy[noise_mask(result)].max())


def torch_logits(acts: torch.Tensor, *, standardize: bool = True, l2: float = 1.0) -> torch.Tensor:
    """The torch solver's logits [L*H, rows] for every row, as `fit_probes` computes them."""
    n_train = train_pair_count(acts.shape[0], 0.8)
    features, _, _ = _features(acts, 2 * n_train, centre=True, scale=standardize)
    return _fit_torch(features, torch.tensor([1.0, 0.0]).repeat(n_train), l2)[0]


@pytest.mark.parametrize(
    ("n_pairs", "d_head"),
    [(300, 16), (40, 128)],  # 480 train rows > 16 features; 64 train rows < 128 (kernel path)
    ids=["n>d", "n<d"],
)
def test_planted_heads_rank_first_and_noise_is_chance(n_pairs: int, d_head: int) -> None:
    result = fit_probes(planted_acts(n_pairs, d_head))

    assert result.accuracy.shape == result.train_accuracy.shape == (3, 4)
    assert planted_beat_noise(result)
    for layer, head in PLANTED:
        assert result.accuracy[layer, head] >= 0.95
    assert abs(result.accuracy[noise_mask(result)].mean().item() - 0.5) < 0.1


@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_torch_agrees_with_sklearn(n_pairs: int, d_head: int) -> None:
    acts = planted_acts(n_pairs, d_head, shift=1.0)  # weak signal: many borderline rows
    fast = fit_probes(acts, method="torch")
    slow = fit_probes(acts, method="sklearn")

    assert (fast.accuracy - slow.accuracy).abs().mean() <= 0.02
    assert (fast.train_accuracy - slow.train_accuracy).abs().mean() <= 0.02
    assert (fast.method, slow.method) == ("torch", "sklearn")


@pytest.mark.parametrize(
    ("shift", "standardize", "l2"),
    [(1.0, True, 1.0), (20.0, True, 1.0), (1.0, True, 0.25), (1.0, True, 4.0), (1.0, False, 1.0)],
    ids=["weak", "separable", "l2=0.25", "l2=4", "raw"],
)
@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_torch_logits_match_sklearn_decision_function(
    n_pairs: int, d_head: int, shift: float, standardize: bool, l2: float
) -> None:
    """Same optimum, not just similar accuracy, in primal (n>d) and kernel (n<d) form alike.

    The reference is a tightly converged float64 fit (sklearn's exact Newton solver) on the
    features sklearn gets: raw ones are not even centred, which changes no logit at the
    optimum. The float32 Newton stops at a gradient of 1e-5 per row, within ~1e-3 of the
    optimum's logits.
    """
    from sklearn.linear_model import LogisticRegression

    acts = planted_acts(n_pairs, d_head, shift=shift)
    if not standardize:
        acts = acts * 3 + 2  # raw scale and offset
    n_train = train_pair_count(n_pairs, 0.8)
    features, _, _ = _features(acts, 2 * n_train, centre=standardize, scale=standardize)
    y = torch.tensor([1.0, 0.0]).repeat(n_train)
    logits = torch_logits(acts, standardize=standardize, l2=l2)

    for head, head_logits in zip(features.double().numpy(), logits, strict=True):
        clf = LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=1e-10, max_iter=1000)
        expected = torch.from_numpy(clf.fit(head[: len(y)], y.numpy()).decision_function(head))
        error = (head_logits.double() - expected).abs().max() / expected.abs().max()
        assert error < 2e-3


@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_heads_are_fitted_independently(n_pairs: int, d_head: int) -> None:
    """Each head fitted alone gives what it gets in the batch: batching couples nothing (a head
    that converges first stops moving while the others go on)."""
    acts = planted_acts(n_pairs, d_head, shift=3.0)
    whole = torch_logits(acts)
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    single = torch.cat([torch_logits(acts[:, :, i : i + 1, j : j + 1]) for i, j in heads])
    assert torch.allclose(single, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["torch", "sklearn"])
@pytest.mark.parametrize("standardize", [True, False])
def test_activations_are_not_modified(method: str, standardize: bool) -> None:
    acts = planted_acts(20, 8) + 1
    before = acts.clone()
    fit_probes(acts, method=method, standardize=standardize)
    fit_probes(acts[:, :, :1, :1], method=method, standardize=standardize)  # a one-head view
    assert torch.equal(acts, before)


def test_split_keeps_pairs_whole() -> None:
    assert train_pair_count(500, 0.8) == 400  # the released code's int(n * 0.8)
    assert train_pair_count(10, 0.5) == 5
    acts = planted_acts(50, 16)
    n_train = train_pair_count(50, 0.8)
    result = fit_probes(acts)
    assert (result.n_train_pairs, result.n_test_pairs) == (n_train, 50 - n_train)

    # training sees only the first n_train pairs, both sides: rewriting any test pair (or just
    # one side of one) changes nothing learned, while the train side of a pair does
    for edit in (slice(n_train, None), (n_train, 1), (n_train, 0)):
        changed = acts.clone()
        changed[edit] = torch.randn_like(changed[edit]) * 10
        assert torch.equal(fit_probes(changed).train_accuracy, result.train_accuracy)
    changed = acts.clone()
    changed[:n_train, 0, 0, 1] = changed[:n_train, 1, 0, 1]  # planted head loses its signal
    assert fit_probes(changed).train_accuracy[0, 1] < result.train_accuracy[0, 1]


def test_train_frac_moves_the_split() -> None:
    result = fit_probes(planted_acts(40, 8), train_frac=0.5)
    assert (result.n_train_pairs, result.n_test_pairs, result.train_frac) == (20, 20, 0.5)


@pytest.mark.parametrize(("n_pairs", "train_frac"), [(4, 0.8), (3, 0.5), (10, 0.9), (10, 0.1)])
def test_too_few_pairs_for_a_split(n_pairs: int, train_frac: float) -> None:
    with pytest.raises(DesteinError, match="at least 2"):
        fit_probes(planted_acts(n_pairs, 8), train_frac=train_frac)


@pytest.mark.parametrize("train_frac", [0.0, 1.0, 1.5])
def test_train_frac_out_of_range(train_frac: float) -> None:
    with pytest.raises(DesteinError, match="train_frac"):
        fit_probes(planted_acts(20, 8), train_frac=train_frac)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["torch", "sklearn"])
@pytest.mark.parametrize("pair", [3, 18], ids=["train-row", "test-row"])
@pytest.mark.parametrize("d_head", [8, 64], ids=["n>d", "n<d"])  # 32 train rows
def test_non_finite_activations(bad: float, method: str, pair: int, d_head: int) -> None:
    acts = planted_acts(20, d_head)
    acts[pair, 1, 2, 0, 5] = bad
    with pytest.raises(DesteinError, match="NaN or inf"):
        fit_probes(acts, method=method)


@pytest.mark.parametrize(
    "acts",
    [torch.zeros(10, 3, 2, 2, 4), torch.zeros(10, 2, 4, 4), torch.zeros(10, 2, 2, 2, 4).long()],
    ids=["three-sides", "4d", "integer"],
)
def test_bad_activation_tensors(acts: torch.Tensor) -> None:
    with pytest.raises(DesteinError, match="probe activations"):
        fit_probes(acts)


def test_bad_options() -> None:
    acts = planted_acts(20, 8)
    with pytest.raises(DesteinError, match="unknown probe method"):
        fit_probes(acts, method="svm")  # type: ignore[arg-type]
    with pytest.raises(DesteinError, match="l2"):
        fit_probes(acts, l2=0.0)


def test_result_is_frozen_and_compared_by_identity() -> None:
    """The one head ranking is `DetoxVectors.ranking()`; a result holds tensors, which `==`
    would compare elementwise, so results compare by identity."""
    result = fit_probes(planted_acts(20, 8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.accuracy = torch.zeros(3, 4)  # type: ignore[misc]
    assert result == result and result != fit_probes(planted_acts(20, 8))
    assert not hasattr(result, "ranking")


@pytest.mark.parametrize("method", ["torch", "sklearn"])
def test_deterministic(method: str) -> None:
    acts = planted_acts(60, 16, shift=1.0)
    first, second = fit_probes(acts, method=method), fit_probes(acts, method=method)
    assert torch.equal(first.accuracy, second.accuracy)
    assert torch.equal(first.train_accuracy, second.train_accuracy)


def test_unstandardized_and_half_precision_inputs() -> None:
    acts = planted_acts(60, 16) * 20 + 3  # raw scale, as the released code fits it
    fast = fit_probes(acts.half(), standardize=False)
    slow = fit_probes(acts.half(), standardize=False, method="sklearn")
    assert planted_beat_noise(fast)
    assert (fast.accuracy - slow.accuracy).abs().mean() <= 0.02
    # half precision is only the storage: the fit runs in float32 on the same values
    upcast = fit_probes(acts.half().float(), standardize=False)
    assert torch.equal(fast.accuracy, upcast.accuracy)
    assert torch.equal(fast.train_accuracy, upcast.train_accuracy)


@pytest.mark.parametrize("method", ["torch", "sklearn"])
@pytest.mark.parametrize("standardize", [True, False])
def test_probes_apply_to_raw_activations(method: str, standardize: bool) -> None:
    """weight . x + bias on the raw activations reproduces the fit's own accuracies (the
    standardisation is folded in), so a probe can be applied to a head's output anywhere."""
    acts = planted_acts(40, 16, shift=3.0)
    result = fit_probes(acts, method=method, standardize=standardize)
    assert result.weight.shape == (3, 4, 16) and result.bias.shape == (3, 4)
    logits = torch.einsum("psLHd,LHd->psLH", acts, result.weight) + result.bias
    labels = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    hits = ((logits > 0).float() == labels).float()
    n_train, n_test = result.n_train_pairs, result.n_test_pairs
    # the same logits up to float rounding: at most a text on the boundary may flip
    assert (hits[n_train:].mean(dim=(0, 1)) - result.accuracy).abs().max() <= 1 / (2 * n_test) + 1e-6
    assert (hits[:n_train].mean(dim=(0, 1)) - result.train_accuracy).abs().max() <= 1 / (2 * n_train) + 1e-6
