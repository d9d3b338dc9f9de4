"""Causal head selection: cross-fitted rankings at vector build, `heads="causal:k"`, storage."""

from __future__ import annotations

import pytest
import torch

from destein_lens import DesteinError
from destein_lens.attribution import causal_rankings, held_out, steering_effects
from destein_lens.attribution.gradient import first_order_steering
from destein_lens.attribution.selection import fold_pairs
from destein_lens.pairs import SteeringPairs, builtin_seed_pairs
from destein_lens.steering import SteeringConfig, check_heads, head_mask, parse_heads, selected_heads, steer
from destein_lens.vectors import DetoxVectors, build_vectors

K = 4


@pytest.fixture(scope="module")
def pairs() -> SteeringPairs:
    return builtin_seed_pairs().head(12)


@pytest.fixture(scope="module")
def ranked(tiny_model, pairs) -> DetoxVectors:
    vectors = build_vectors(tiny_model, pairs, k=K, progress=False)
    return causal_rankings(tiny_model, vectors, pairs, forms=("destein", "destein-gated"), progress=False)


def test_crossfit_scores_each_fold_with_vectors_from_the_other(tiny_model, pairs, ranked) -> None:
    ranking = ranked.causal_ranking("destein")
    assert ranking.values.shape == (2, 4, len(pairs))
    assert ranking.scored_on["fold_sizes"] == [6, 6] and ranking.scored_on["how"] == "cross-fit"
    first, second = fold_pairs(pairs)
    other = build_vectors(tiny_model, second, k=K, progress=False)
    expected = first_order_steering(
        tiny_model, other, held_out(tiny_model, first), ["destein"], progress=False
    )
    torch.testing.assert_close(ranking.values[..., :6], expected["destein"], rtol=1e-4, atol=1e-6)
    assert 0.0 <= ranking.fold_overlap(3) <= 1.0
    assert set(ranked.causal) == {"destein", "destein-gated"}


def test_causal_heads_steer_the_top_of_the_forms_ranking(tiny_model, ranked) -> None:
    top = ranked.causal_ranking("destein").ranking()[:3]
    assert selected_heads(ranked, "causal:3") == top
    assert head_mask(ranked, "causal:3").sum() == 3
    assert (
        selected_heads(ranked, "causal:3", "destein-gated")
        == ranked.causal_ranking("destein-gated").ranking()[:3]
    )
    ids = tiny_model.tokenizer("The weather today is", return_tensors="pt").input_ids
    outputs = []
    for heads in ("causal:3", top):
        with torch.no_grad(), steer(tiny_model, ranked, alpha=0.3, heads=heads):
            outputs.append(tiny_model(ids))
    assert torch.equal(outputs[0], outputs[1])


def test_rankings_are_saved_with_the_vectors(tiny_model, pairs, ranked, tmp_path) -> None:
    again = DetoxVectors.load(ranked.save(tmp_path / "v"), model=tiny_model)
    for form, ranking in ranked.causal.items():
        assert torch.equal(again.causal[form].values, ranking.values)
        assert again.causal[form].scored_on == ranking.scored_on
    plain = build_vectors(tiny_model, pairs, k=K, progress=False)
    assert DetoxVectors.load(plain.save(tmp_path / "plain")).causal == {}
    with pytest.raises(DesteinError, match="no causal ranking for destein"):
        head_mask(plain, "causal:2")


def test_held_out_scoring_and_its_refusals(tiny_model, pairs, ranked) -> None:
    held = builtin_seed_pairs().head(20)
    extra = SteeringPairs(held.toxic[12:], held.nontoxic[12:], "builtin tail")
    scored = causal_rankings(tiny_model, ranked, pairs, held=extra, progress=False)
    assert scored.causal["destein"].scored_on["how"] == "held-out"
    assert scored.causal["destein"].fold_overlap(3) is None
    assert "destein-gated" in scored.causal  # rankings of other forms are kept
    with pytest.raises(DesteinError, match="share texts"):
        causal_rankings(tiny_model, ranked, pairs, held=pairs, progress=False)
    with pytest.raises(DesteinError, match="not the pairs"):
        causal_rankings(tiny_model, ranked, extra, progress=False)
    with pytest.raises(DesteinError, match="head-wise"):
        causal_rankings(tiny_model, ranked, pairs, forms=("actadd",), progress=False)


def test_confirm_rescores_the_shortlist_exactly(tiny_model, pairs, ranked) -> None:
    held = builtin_seed_pairs().head(20)
    extra = SteeringPairs(held.toxic[12:], held.nontoxic[12:], "builtin tail")
    plain = causal_rankings(tiny_model, ranked, pairs, held=extra, progress=False).causal["destein"]
    confirmed = causal_rankings(tiny_model, ranked, pairs, held=extra, confirm=2, progress=False).causal[
        "destein"
    ]
    exact = steering_effects(tiny_model, ranked, held_out(tiny_model, extra), alpha=0.1, progress=False)
    shortlist = plain.ranking()[:2]
    for layer, head in shortlist:
        torch.testing.assert_close(confirmed.values[layer, head], exact["steering"].values[layer, head])
    rest = [(a, b) for a in range(2) for b in range(4) if (a, b) not in shortlist]
    for layer, head in rest:
        assert torch.equal(confirmed.values[layer, head], plain.values[layer, head])
    assert confirmed.scored_on["confirmed_top"] == 2


def test_causal_head_selections_are_validated() -> None:
    assert parse_heads("causal:16") == "causal:16"
    assert SteeringConfig(heads="causal:04").heads == "causal:4"
    for bad in ("causal:0", "causal:", "causal:x", "probe:3"):
        with pytest.raises(DesteinError, match="causal:k"):
            SteeringConfig(heads=bad)
    with pytest.raises(DesteinError, match="between 1 and 8"):
        check_heads("causal:9", 2, 4)
    with pytest.raises(DesteinError, match="does not act on heads"):
        SteeringConfig(heads="causal:2", form="actadd")
