"""Per-head probes: planted heads win, torch agrees with the sklearn reference, splits are by pair."""

from __future__ import annotations

import pytest
import torch

from destein_lens import probes
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


@pytest.mark.parametrize(
    ("n_pairs", "d_head"),
    [(300, 16), (40, 128)],  # 480 train rows > 16 features; 64 train rows < 128 (kernel path)
    ids=["n>d", "n<d"],
)
def test_planted_heads_rank_first_and_noise_is_chance(n_pairs: int, d_head: int) -> None:
    result = fit_probes(planted_acts(n_pairs, d_head))

    assert set(result.top_k(len(PLANTED))) == set(PLANTED)
    assert set(result.ranking()[: len(PLANTED)]) == set(PLANTED)
    for layer, head in PLANTED:
        assert result.accuracy[layer, head] >= 0.95
    assert abs(result.accuracy[noise_mask(result)].mean().item() - 0.5) < 0.1
    mask = result.mask(len(PLANTED))
    assert mask.shape == (3, 4) and mask.sum() == len(PLANTED)
    assert all(mask[layer, head] for layer, head in PLANTED)


@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_torch_agrees_with_sklearn(n_pairs: int, d_head: int) -> None:
    acts = planted_acts(n_pairs, d_head, shift=1.0)  # weak signal: many borderline rows
    fast = fit_probes(acts, method="torch")
    slow = fit_probes(acts, method="sklearn")

    assert (fast.accuracy - slow.accuracy).abs().mean() <= 0.02
    assert (fast.train_accuracy - slow.train_accuracy).abs().mean() <= 0.02
    assert (fast.method, slow.method) == ("torch", "sklearn")


@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_torch_logits_match_sklearn_decision_function(n_pairs: int, d_head: int) -> None:
    """Same optimum, not just similar accuracy: the n<d (kernel) solver is exact.

    The reference is a tightly converged float64 fit (sklearn's exact Newton solver); the
    float32 Newton stops at a gradient of 1e-5 per row, within ~1e-3 of the optimum's logits.
    """
    from sklearn.linear_model import LogisticRegression

    acts = planted_acts(n_pairs, d_head, shift=1.0)
    n_train = train_pair_count(n_pairs, 0.8)
    features = _features(acts, n_train, standardize=True)
    y = torch.tensor([1.0, 0.0]).repeat(n_train)
    logits = _fit_torch(acts, y, l2=1.0, standardize=True)

    for head, head_logits in zip(features.double().numpy(), logits, strict=True):
        clf = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-10, max_iter=1000)
        expected = torch.from_numpy(clf.fit(head[: len(y)], y.numpy()).decision_function(head))
        error = (head_logits.double() - expected).abs().max() / expected.abs().max()
        assert error < 2e-3


@pytest.mark.parametrize(("n_pairs", "d_head"), [(300, 16), (24, 64)], ids=["n>d", "n<d"])
def test_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch, n_pairs: int, d_head: int) -> None:
    """Heads solved in one chunk or one at a time (each straggler reloaded alone) agree."""
    acts = planted_acts(n_pairs, d_head, shift=3.0)
    n_train = train_pair_count(n_pairs, 0.8)
    y = torch.tensor([1.0, 0.0]).repeat(n_train)
    whole = probes._fit_torch(acts, y, l2=1.0, standardize=True)
    unsolved = []
    majorise = probes._majorise

    def recording(*args: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        coef, left = majorise(*args)
        unsolved.append(left)
        return coef, left

    monkeypatch.setattr(probes, "_CHUNK_BYTES", 1)  # one head per chunk
    monkeypatch.setattr(probes, "_majorise", recording)
    single = probes._fit_torch(acts, y, l2=1.0, standardize=True)

    assert torch.allclose(single, whole, rtol=1e-4, atol=1e-4)
    if 2 * n_train > d_head:  # the planted heads outrun the bound and finish with Newton
        assert len(unsolved) == 12 and 0 < int(torch.cat(unsolved).sum()) < 12


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
    result = fit_probes(acts)
    with pytest.raises(DesteinError, match="k must be"):
        result.top_k(13)
    assert result.mask(0).sum() == 0 and result.mask(12).all()


@pytest.mark.parametrize("method", ["torch", "sklearn"])
def test_deterministic(method: str) -> None:
    acts = planted_acts(60, 16, shift=1.0)
    first, second = fit_probes(acts, method=method), fit_probes(acts, method=method)
    assert torch.equal(first.accuracy, second.accuracy)
    assert torch.equal(first.train_accuracy, second.train_accuracy)
    assert first.ranking() == second.ranking()


def test_ranking_breaks_ties_by_train_accuracy_then_index() -> None:
    result = ProbeResult(
        accuracy=torch.tensor([[0.5, 0.9], [0.9, 0.5]]),
        train_accuracy=torch.tensor([[0.6, 0.7], [0.8, 0.6]]),
        method="torch",
        train_frac=0.8,
        n_train_pairs=8,
        n_test_pairs=2,
    )
    assert result.ranking() == [(1, 0), (0, 1), (0, 0), (1, 1)]
    assert result.top_k(1) == [(1, 0)]


def test_unstandardized_and_half_precision_inputs() -> None:
    acts = planted_acts(60, 16) * 20 + 3  # raw scale, as the released code fits it
    fast = fit_probes(acts.half(), standardize=False)
    slow = fit_probes(acts.half(), standardize=False, method="sklearn")
    assert set(fast.top_k(2)) == set(PLANTED)
    assert (fast.accuracy - slow.accuracy).abs().mean() <= 0.02
