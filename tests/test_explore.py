"""The explorer driven from Python as the page drives it: heads, sliders, presets, maps, the
background worker, and the code it shows reproducing what it shows (tiny model)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from plotly.callbacks import Points

from destein_lens import explore
from destein_lens.attribution import HeadEffects, StudyResults
from destein_lens.errors import DesteinError
from destein_lens.explorer.background import Cancelled, Worker
from destein_lens.explorer.contrast import draw, teacher_forced
from destein_lens.generation import SamplingConfig, generate_ids, protocol_sampling
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.perplexity import conditional_perplexity
from destein_lens.registry import decoding
from destein_lens.steering import SteeringConfig, steer
from destein_lens.vectors import CausalRanking, DetoxVectors, build_vectors

PROMPT = "You are such a"


@pytest.fixture(scope="module")
def vectors(tiny_model) -> DetoxVectors:
    return build_vectors(tiny_model, builtin_seed_pairs().head(20), k=4, progress=False)


@pytest.fixture
def explorer(tiny_model, vectors):
    ex = explore(tiny_model, vectors, [PROMPT, "The weather today is"], samples=3, max_new_tokens=6)
    assert ex.wait(60)
    yield ex
    ex.close()


def _texts(side) -> list[str]:
    return [c.text for c in side]


def _done(ex) -> None:
    assert ex.wait(60)
    assert ex.status.value.startswith("done"), (ex.status.value, ex.error)


def test_clicked_heads_are_steered_and_starred(explorer, vectors) -> None:
    assert explorer.heads == "all" and explorer.result.config == SteeringConfig()
    heatmap, stars = explorer.map.data
    assert stars.hoverinfo == "skip"  # a click goes to the cell under the cursor, never a star nearby
    heatmap._dispatch_on_click(Points([0], [2], [1], heatmap.name, 0), None)  # a click on L1H2
    _done(explorer)
    every = {(layer, head) for layer in range(2) for head in range(4)}
    assert set(explorer.selected) == every - {(1, 2)}
    assert explorer.result.config.heads == tuple(sorted(every - {(1, 2)}))
    assert set(zip(stars.y, stars.x)) == every - {(1, 2)}
    explorer.toggle(1, 2)  # back in: the whole set again
    _done(explorer)
    assert explorer.heads == "all" and len(stars.x) == 8
    explorer.select([(0, 3)])
    _done(explorer)
    assert "heads=((0, 3),)" in explorer.code_view.value


def test_strength_zero_steers_nothing_and_keeps_the_unsteered_side(explorer) -> None:
    first = explorer.result
    explorer.strength.value = 0.0
    _done(explorer)
    zero = explorer.result
    assert _texts(zero.unsteered) == _texts(first.unsteered)  # kept, not redrawn
    assert _texts(zero.steered) == _texts(zero.unsteered)  # same seed, no hook: the same draw
    assert all(abs(s) < 1e-4 for c in zero.steered + zero.unsteered for s in c.shift)  # forward vs cache
    explorer.strength.value = 0.9
    _done(explorer)
    assert explorer.result.config.alpha == 0.9
    assert _texts(explorer.result.steered) != _texts(zero.steered)
    assert len(explorer._unsteered) == 1


def test_the_code_shown_reproduces_the_screen(explorer, tiny_model, vectors) -> None:
    explorer.select([(0, 1), (1, 3)])
    explorer.strength.value = 0.5
    explorer.positions.value = "generated"
    explorer.seed.value = 7
    _done(explorer)
    shown = {"model": tiny_model, "vectors": vectors}
    exec(explorer.code, shown)
    assert shown["config"] == explorer.result.config
    assert shown["unsteered"] == _texts(explorer.result.unsteered)
    assert shown["steered"] == _texts(explorer.result.steered)


def test_tally_is_the_harness_on_the_tally_prompts(explorer, tiny_model, vectors) -> None:
    explorer.tally_on.value = True
    _done(explorer)
    tally = explorer.tally
    assert tally.perplexity_ratio == pytest.approx(
        tally.steered["perplexity"] / tally.unsteered["perplexity"]
    )
    shown = {"model": tiny_model, "vectors": vectors, "explorer": explorer}
    exec(explorer.code, shown)
    for cell, metrics in (("baseline", tally.unsteered), ("steered", tally.steered)):
        for key in ("expected_max_toxicity", "toxicity_probability", "perplexity"):
            assert shown["metrics"][cell][key] == pytest.approx(metrics[key])
    assert "perplexity ratio" in explorer.tally_view.value


def test_tokens_shifts_and_perplexities(explorer, tiny_model, vectors) -> None:
    shown: list[str] = []
    explorer.output.observe(lambda change: shown.append(change["new"]), "value")
    explorer.strength.value = 0.6
    _done(explorer)
    assert len(shown) == 2 and "perplexity …" in shown[0]  # the texts first, then the shading
    assert "perplexity …" not in shown[1]
    result = explorer.result
    for c in result.unsteered + result.steered:
        assert "".join(c.pieces) == c.text and len(c.shift) == len(c.pieces)
    expected = conditional_perplexity(tiny_model, [PROMPT] * 3, _texts(result.steered))
    assert [c.perplexity for c in result.steered] == pytest.approx(expected, rel=1e-4)
    html = explorer.output.value
    assert html.count('class="destein-steered"') == 3 and "profanity-check" in html


@pytest.mark.parametrize("form", ["destein", "self-detoxify"])
def test_teacher_forcing_gives_the_decoding_log_probs(tiny_model, vectors, form) -> None:
    """A hook method is forced in one forward, a decoding-time one through the loop: both give what
    sampling computed for the same tokens."""
    config = SteeringConfig(alpha=0.5, heads=[(0, 1), (1, 2)], positions="generated", form=form)
    sampling = protocol_sampling(3, 0, 8)
    with steer(tiny_model, vectors, config):
        drawn = draw(tiny_model, PROMPT, sampling, [])
        forced = teacher_forced(tiny_model, drawn, through_loop=form == "self-detoxify")
    assert torch.allclose(forced, drawn.logprobs, atol=1e-4)


def test_presets_causal_ranking_and_methods(tiny_model, vectors) -> None:
    causal = CausalRanking("destein", 0.1, torch.arange(8.0).reshape(2, 4, 1), {"source": "test"})
    ex = explore(
        tiny_model, replace(vectors, causal={"destein": causal}), [PROMPT], samples=1, max_new_tokens=3
    )
    try:
        ex.k.value = 3
        ex.select(ex.k.value)
        assert ex.selected == vectors.ranking()[:3]
        assert not ex.causal_button.disabled
        ex.causal_button.click()
        _done(ex)
        assert ex.heads == "causal:3" and ex.selected == [(1, 3), (1, 2), (1, 1)]
        ex.method.value = "additive"  # no causal ranking: the heads it stood for
        _done(ex)
        assert ex.heads == ((1, 1), (1, 2), (1, 3)) and ex.causal_button.disabled
        ex.method.value = "self-detoxify"
        _done(ex)
        assert ex.strength.max == 5.0 and ex.strength.value == 0.1
        ex.method.value = "iti"  # these vectors hold no ITI fit: said, not raised
        assert ex.wait(60) and "no iti fit" in ex.status.value
    finally:
        ex.close()


def test_a_study_map(tiny_model, vectors) -> None:
    values = torch.arange(16.0).reshape(2, 4, 2)
    effects = HeadEffects("steering", values, "nats/token", "gap drop")
    study = StudyResults({}, {"steering": effects}, None, None, None, None, vectors.probe_accuracy)
    ex = explore(tiny_model, vectors, [PROMPT], study=study, samples=1, max_new_tokens=3)
    try:
        assert ex.map_top_button.disabled
        ex.map_choice.value = "steering"
        assert [list(row) for row in ex.map.data[0].z] == values.mean(-1).tolist()
        ex.k.value = 2
        ex.map_top_button.click()
        _done(ex)
        assert ex.selected == [(1, 2), (1, 3)] and len(ex.map.data[1].x) == 2
    finally:
        ex.close()
    other = HeadEffects("steering", torch.zeros(3, 4, 2), "nats/token", "gap drop")
    with pytest.raises(DesteinError, match="grid"):
        explore(tiny_model, vectors, study=replace(study, effects={"steering": other}))


def test_a_new_request_cancels_the_one_in_flight(tiny_model) -> None:
    worker, finished = Worker(), []

    def long(job) -> None:
        with decoding([job]):
            generate_ids(tiny_model, [PROMPT], SamplingConfig(do_sample=False, max_new_tokens=60))
        finished.append("long")

    first = worker.submit(
        long, on_step=lambda steps: steps == 3 and worker.submit(lambda job: finished.append("next"))
    )
    assert worker.wait(60)
    assert first.cancelled and first.steps == 3 and finished == ["next"]
    with pytest.raises(Cancelled):
        first.check()


def test_the_explorer_keeps_only_the_newest_request(explorer) -> None:
    explorer.tokens.value = 64
    explorer.samples.value = 16
    explorer.cancel_button.click()
    assert explorer.wait(60) and explorer.status.value == "cancelled"
    for alpha in (0.2, 0.3, 0.4):
        explorer.strength.value = alpha
    _done(explorer)
    assert explorer.result.config.alpha == 0.4 and len(explorer.result.steered) == 16


def test_bad_input_is_refused_or_said(explorer, tiny_model, vectors) -> None:
    with pytest.raises(DesteinError, match="prompt 0 is empty"):
        explore(tiny_model, vectors, ["  "])
    with pytest.raises(DesteinError, match="samples"):
        explore(tiny_model, vectors, samples=0)
    with pytest.raises(DesteinError, match="out of range"):
        explore(tiny_model, vectors, heads=[(5, 0)])
    with pytest.raises(DesteinError, match="scorer"):
        explore(tiny_model, vectors, scorers=())
    shown = explorer.result
    explorer.select(())
    assert "no heads selected" in explorer.status.value and explorer.result is shown
    with pytest.raises(DesteinError, match="no heads selected"):
        _ = explorer.config
    explorer.select("all")
    explorer.prompt.value = " "
    assert "empty" in explorer.status.value
    explorer.prompt.value = "word " * 300
    assert explorer.wait(60) and "context" in explorer.status.value
    explorer.toggle(9, 9)
    assert "out of range" in explorer.status.value
    assert math.isfinite(shown.steered[0].perplexity)
