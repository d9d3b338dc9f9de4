"""Head attribution: single-head steering effects on the held-out log-prob gap, and their figure."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from destein_lens import DesteinError
from destein_lens.attribution import HeadAttribution, head_attribution, logprob_gap, mean_token_logprobs
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.steering import DEFAULT_STRENGTH, steer
from destein_lens.vectors import DetoxVectors, build_vectors
from destein_lens.views import attribution_figure


@pytest.fixture(scope="module")
def split():
    return builtin_seed_pairs().head(20).split(0.8)


@pytest.fixture(scope="module")
def vectors(tiny_model, split) -> DetoxVectors:
    return build_vectors(tiny_model, split[0], k=4, progress=False)


@pytest.fixture(scope="module")
def result(tiny_model, vectors, split) -> HeadAttribution:
    return head_attribution(tiny_model, vectors, split[1], progress=False)


def test_shape_and_values(result: HeadAttribution, split) -> None:
    assert result.effect.shape == (2, 4)
    assert torch.isfinite(result.effect).all()
    assert result.effect.abs().max() > 0
    assert math.isfinite(result.baseline_gap)
    assert -1.0 <= result.spearman <= 1.0
    assert (result.alpha, result.n_pairs) == (DEFAULT_STRENGTH, len(split[1]))  # the one default


def test_by_effect_orders_heads_by_effect(result: HeadAttribution) -> None:
    order = result.by_effect()
    assert sorted(order) == [(layer, head) for layer in range(2) for head in range(4)]
    effects = [result.effect[layer, head].item() for layer, head in order]
    assert effects == sorted(effects, reverse=True)


def test_results_compare_by_identity(result: HeadAttribution) -> None:
    """Field-wise == would compare the effect tensors elementwise and raise instead of answering."""
    copy = dataclasses.replace(result)
    assert result == result and copy != result
    assert len({result, copy}) == 2


def test_effect_is_the_change_in_gap(tiny_model, vectors, split, result: HeadAttribution) -> None:
    with steer(tiny_model, vectors, alpha=result.alpha, heads=[(1, 2)]):
        steered = logprob_gap(tiny_model, split[1])
    assert result.effect[1, 2].item() == pytest.approx(result.baseline_gap - steered, abs=1e-6)


def test_alpha_zero_gives_exactly_zero_effect(tiny_model, vectors, split) -> None:
    zero = head_attribution(tiny_model, vectors, split[1], alpha=0.0, progress=False)
    assert torch.equal(zero.effect, torch.zeros(2, 4))
    assert math.isnan(zero.spearman)  # a constant grid has no ranking


def test_batched_logprobs_match_one_text_at_a_time(tiny_model, split) -> None:
    texts = list(split[1].toxic + split[1].nontoxic)  # different lengths: right padding in play
    batched = mean_token_logprobs(tiny_model, texts)
    single = mean_token_logprobs(tiny_model, texts, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    assert (batched < 0).all()


def test_refuses_the_training_pairs_as_held_out(tiny_model, vectors, split) -> None:
    with pytest.raises(DesteinError, match="held-out"):
        head_attribution(tiny_model, vectors, split[0], progress=False)


def test_figure_puts_effect_next_to_probe_accuracy(result: HeadAttribution, vectors) -> None:
    fig = attribution_figure(result, vectors, top_k=3)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 2
    assert torch.allclose(torch.tensor(heatmaps[0].z, dtype=torch.float32), result.effect)
    assert heatmaps[0].zmid == 0.0
    assert f"{result.spearman:.2f}" in fig.layout.title.text
    stars = [t for t in fig.data if t.type == "scatter"]
    top3 = vectors.ranking()[:3]  # the heads steer(heads=3) picks, starred on both panels
    assert [list(zip(s.y, s.x)) for s in stars] == [top3, top3]
    assert stars[0].name == stars[1].name == "the top-3 heads steer(heads=3) picks"
    assert [s.showlegend for s in stars] == [None, False]  # listed once in the legend
    assert [h.colorbar.x for h in heatmaps] == [fig.layout.xaxis.domain[1] + 0.01, 1.01]
    assert fig.layout.xaxis.title.text == fig.layout.xaxis2.title.text == "head"


@pytest.mark.real
def test_real_model_heads_move_the_gap(real_model) -> None:
    train, held_out = builtin_seed_pairs().head(18).split(2 / 3)  # 12 train, 6 held-out
    vectors = build_vectors(real_model, train, progress=False)
    result = head_attribution(real_model, vectors, held_out, progress=False)
    assert result.effect.shape == (18, 4)
    assert torch.isfinite(result.effect).all()
    assert (result.effect != 0).any()
    assert -1.0 <= result.spearman <= 1.0
