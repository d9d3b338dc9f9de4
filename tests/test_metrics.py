"""Metrics checked against small examples computed by hand."""

import math

import pytest

from destein_lens.errors import DesteinError
from destein_lens.metrics import (
    distinct_n,
    expected_max_toxicity,
    mean_perplexity,
    paired,
    perplexity_interval,
    summarise,
    toxicity_probability,
)

# Per-prompt maxima: 0.2, 0.5, 0.8.
SCORES = [[0.1, 0.2, 0.05], [0.5, 0.3, 0.0], [0.4, 0.8, 0.6]]


def test_expected_max_toxicity_is_mean_and_population_std_of_maxima():
    mean, std = expected_max_toxicity(SCORES)
    # mean (0.2 + 0.5 + 0.8) / 3 = 0.5; deviations -0.3, 0, 0.3 -> variance 0.18 / 3 = 0.06
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(0.06))


def test_toxicity_probability_counts_prompts_with_any_sample_at_threshold():
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)  # 0.5 and 0.8 reach 0.5
    assert toxicity_probability(SCORES, threshold=0.55) == pytest.approx(1 / 3)  # only 0.8
    assert toxicity_probability([[0.0], [0.9, 0.1]]) == pytest.approx(1 / 2)


GENERATIONS = [
    # 6 words; unigrams the/cat/sat/ran = 4; bigrams "the cat", "cat sat", "cat ran" = 3
    # ("sat the" spans two samples, so it does not count); trigrams 2.
    ["the cat sat", "the cat ran"],
    # 4 words; one distinct unigram, bigram and trigram each.
    ["a a a a"],
    # no words at all: scores 0 for every n.
    ["", "   "],
]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (4 / 6 + 1 / 4 + 0) / 3),  # = 11/36
        (2, (3 / 6 + 1 / 4 + 0) / 3),  # = 1/4
        (3, (2 / 6 + 1 / 4 + 0) / 3),  # = 7/36
        (4, (0 / 6 + 1 / 4 + 0) / 3),  # = 1/12
    ],
)
def test_distinct_n_divides_unique_ngrams_by_words_per_prompt(n, expected):
    assert distinct_n(GENERATIONS, n) == pytest.approx(expected)


def test_distinct_n_splits_on_any_whitespace():
    assert distinct_n([["a\tb\n  a"]], 1) == pytest.approx(2 / 3)


def test_mean_perplexity_drops_values_at_or_above_cutoff_and_nan():
    assert mean_perplexity([10.0, 20.0, 1e4, 3e4, 30.0, math.nan]) == pytest.approx(20.0)
    assert mean_perplexity([9999.0, 1.0]) == pytest.approx(5000.0)
    assert math.isnan(mean_perplexity([1e4, 2e4]))


def test_summarise_reports_every_metric_with_exact_keys():
    summary = summarise(
        scores=[[0.1, 0.2], [0.5, 0.8]],
        generations=[["the cat sat", "the cat ran"], ["a a a a", ""]],
        perplexities=[[10.0, 20.0], [1e4, 30.0]],
    )
    assert set(summary) == {
        "expected_max_toxicity",
        "expected_max_toxicity_std",
        "expected_max_toxicity_ci",
        "toxicity_probability",
        "toxicity_probability_ci",
        "perplexity",
        "perplexity_ci",
        "dist_1",
        "dist_2",
        "dist_3",
        "n_prompts",
        "samples",
    }
    # maxima 0.2 and 0.8: mean 0.5, population std 0.3, one of two prompts reaches 0.5
    assert summary["expected_max_toxicity"] == pytest.approx(0.5)
    assert summary["expected_max_toxicity_std"] == pytest.approx(0.3)
    assert summary["toxicity_probability"] == pytest.approx(0.5)
    assert summary["perplexity"] == pytest.approx(20.0)  # 1e4 dropped: (10 + 20 + 30) / 3
    assert summary["dist_1"] == pytest.approx((4 / 6 + 1 / 4) / 2)
    assert summary["dist_2"] == pytest.approx((3 / 6 + 1 / 4) / 2)
    assert summary["dist_3"] == pytest.approx((2 / 6 + 1 / 4) / 2)
    assert summary["n_prompts"] == 2
    assert summary["samples"] == 4


@pytest.mark.parametrize(
    "call",
    [
        lambda: expected_max_toxicity([]),
        lambda: expected_max_toxicity([[0.1], []]),
        lambda: toxicity_probability([]),
        lambda: distinct_n([], 1),
        lambda: distinct_n([["a b"]], 0),
        lambda: mean_perplexity([]),
        lambda: summarise([], [], []),
    ],
)
def test_empty_input_is_a_user_error(call):
    with pytest.raises(DesteinError):
        call()


@pytest.mark.parametrize(
    ("scores", "perplexities"),
    [
        ([[0.1], [0.2]], [[1.0], [2.0], [3.0]]),  # perplexities for an extra prompt
        ([[0.1, 0.2], [0.3]], [[1.0], [2.0]]),  # scores for an extra sample
    ],
)
def test_summarise_rejects_inputs_of_different_shapes(scores, perplexities):
    with pytest.raises(DesteinError):
        summarise(scores, [["a"], ["b"]], perplexities)


def test_bootstrap_interval_agrees_with_a_plain_numpy_bootstrap():
    import numpy as np

    from destein_lens.metrics import bootstrap_interval

    values = np.random.default_rng(3).beta(0.5, 2.0, size=60)
    low, high = bootstrap_interval(values.tolist())
    means = values[np.random.default_rng(4).integers(0, 60, size=(20000, 60))].mean(1)
    ref_low, ref_high = np.percentile(means, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.01) and high == pytest.approx(ref_high, abs=0.01)
    assert low < values.mean() < high
    assert bootstrap_interval([0.0, 0.0, 0.0]) == (0.0, 0.0)  # no spread, nothing to resample
    assert bootstrap_interval(values.tolist()) == (low, high)  # reproducible


PPL = [[10.0, 12.0, 11.0], [20.0, 1e5, 18.0], [9.0, 8.0, float("nan")]]


def test_perplexity_interval_resamples_prompts_around_the_mean() -> None:
    low, high = perplexity_interval(PPL)
    assert low <= mean_perplexity([p for row in PPL for p in row]) <= high
    assert low >= 8.0 and high <= 20.0  # only kept values, whole prompts
    assert perplexity_interval([[5.0, 5.0], [5.0]]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in perplexity_interval([[1e5], [math.nan]]))


def test_paired_difference_of_a_cell_with_itself_is_exactly_none() -> None:
    same = paired(SCORES, PPL, SCORES, PPL)
    assert same.emt == (0.0, 0.0, 0.0) and same.tp == (0.0, 0.0, 0.0)
    assert same.ppl_ratio == pytest.approx((1.0, 1.0, 1.0))
    assert not same.dominates


def test_paired_points_are_the_differences_of_the_summaries() -> None:
    better = [[s * 0.5 for s in row] for row in SCORES]
    fluent = [[p * 0.8 for p in row] for row in PPL]
    result = paired(better, fluent, SCORES, PPL)
    assert result.emt[0] == pytest.approx(expected_max_toxicity(better)[0] - expected_max_toxicity(SCORES)[0])
    assert result.tp[0] == pytest.approx(toxicity_probability(better) - toxicity_probability(SCORES))
    flat = [p for row in PPL for p in row]
    assert result.ppl_ratio[0] == pytest.approx(
        mean_perplexity([p * 0.8 for p in flat]) / mean_perplexity(flat)
    )
    # Every prompt is less toxic and more fluent: every resample says so, so a dominates b.
    assert result.emt[2] < 0 and result.ppl_ratio[2] < 1 and result.dominates
    assert not paired(SCORES, PPL, better, fluent).dominates


def test_paired_cells_must_share_their_prompts() -> None:
    with pytest.raises(DesteinError, match="share their prompts"):
        paired(SCORES, PPL, SCORES[:2], PPL[:2])
