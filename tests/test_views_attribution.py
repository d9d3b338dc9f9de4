"""Attribution figures built from small synthetic results: structure, labels, intervals, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_views import _assert_labelled  # the contract every view keeps

from destein_lens import views
from destein_lens.attribution.agreement import Agreement, agreement
from destein_lens.attribution.dla import DirectLogits
from destein_lens.attribution.effects import HeadEffects
from destein_lens.attribution.selection import SelectionCurves
from destein_lens.errors import DesteinError

N_LAYERS, N_HEADS, N_PAIRS, N_TOP = 3, 2, 10, 4


def _effects(
    study: str = "patching", seed: int = 0, shape: tuple[int, int] = (N_LAYERS, N_HEADS)
) -> HeadEffects:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, N_PAIRS, generator=gen) + torch.arange(shape[0] * shape[1]).view(*shape, 1)
    return HeadEffects(study, values, "nats/token", "gap drop when the head is patched")


def _dla(tokens: list | None = None) -> DirectLogits:
    up = torch.linspace(4.0, 1.0, N_TOP).expand(N_LAYERS, N_HEADS, N_TOP)
    logits = torch.stack([up, -up], dim=2)
    ids = torch.arange(N_LAYERS * N_HEADS * 2 * N_TOP).view(N_LAYERS, N_HEADS, 2, N_TOP)
    if tokens is None:
        tokens = [[[[f"t{i}" for i in side] for side in head] for head in layer] for layer in ids.tolist()]
    return DirectLogits(_effects("dla"), ids, logits, tokens, torch.zeros(N_LAYERS, N_HEADS))


def _curves() -> SelectionCurves:
    rankers = ("probe", "causal", "random-0", "random-1", "random-2")
    ks = (1, 2, 4, 6)
    effect = torch.randn(len(rankers), len(ks), N_PAIRS, generator=torch.Generator().manual_seed(1))
    return SelectionCurves(rankers, ks, effect, {r: [] for r in rankers}, 1.5)


def _summary(emt: float) -> dict:
    return {
        "expected_max_toxicity": emt,
        "expected_max_toxicity_ci": [emt - 0.05, emt + 0.05],
        "toxicity_probability": emt / 2,
        "perplexity": 20.0,
    }


def test_effect_grid_shows_mean_with_interval_in_hover() -> None:
    effects = _effects()
    fig = views.effect_grid(effects, marked=[(2, 1)], marked_label="top-1 by patching")
    _assert_labelled(fig)
    heatmap, stars = fig.data
    np.testing.assert_allclose(heatmap.z, effects.mean().numpy(), rtol=1e-6)
    low, high = effects.interval()
    np.testing.assert_allclose(heatmap.customdata[..., 0], low.numpy(), rtol=1e-6)
    np.testing.assert_allclose(heatmap.customdata[..., 1], high.numpy(), rtol=1e-6)
    assert "95% CI low" in heatmap.hovertemplate and "95% CI high" in heatmap.hovertemplate
    assert heatmap.zmid == 0.0
    assert stars.name == "top-1 by patching" and fig.layout.showlegend
    assert "patching" in fig.layout.title.text and "10 pairs" in fig.layout.title.text
    assert "nats/token" in fig.layout.title.text
    assert effects.meaning in fig.layout.title.subtitle.text


def test_effects_without_pairs_are_refused_where_they_are_made() -> None:
    with pytest.raises(DesteinError, match="n_pairs"):
        HeadEffects("steering", torch.zeros(N_LAYERS, N_HEADS, 0), "nats/token", "")
    with pytest.raises(DesteinError, match="n_pairs"):
        HeadEffects("steering", torch.zeros(N_LAYERS, N_HEADS), "nats/token", "")


def test_an_interval_is_bootstrapped_once() -> None:
    effects = _effects()
    assert effects.interval() is effects.interval()
    curves = _curves()
    assert curves.interval() is curves.interval()


def test_top_heads_figure_is_a_forest_per_study() -> None:
    studies = {"patching": _effects("patching"), "steering": _effects("steering", seed=1)}
    fig = views.top_heads_figure(studies, top=4)
    _assert_labelled(fig)
    assert [t.name for t in fig.data] == ["patching", "steering"]
    for trace, effects in zip(fig.data, studies.values()):
        heads = effects.ranking()[:4]
        assert list(trace.y) == [f"L{layer}H{head}" for layer, head in heads]
        mean = effects.mean().numpy()
        low, high = (t.numpy() for t in effects.interval())
        np.testing.assert_allclose(trace.x, [mean[h] for h in heads], rtol=1e-6)
        np.testing.assert_allclose(trace.error_x.arrayminus, [mean[h] - low[h] for h in heads], rtol=1e-5)
        np.testing.assert_allclose(trace.error_x.array, [high[h] - mean[h] for h in heads], rtol=1e-5)
        assert "95% CI" in trace.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"  # largest at the top
    assert fig.layout.xaxis.title.text == "mean effect (nats/token)"
    assert [s.x0 for s in fig.layout.shapes] == [0, 0]  # a zero line per panel
    # More than the grid holds: every head, no error.
    assert len(views.top_heads_figure({"p": _effects()}, top=100).data[0].y) == N_LAYERS * N_HEADS


@pytest.mark.parametrize(("studies", "top", "message"), [({}, 3, "no studies"), ({"p": None}, 0, "top")])
def test_top_heads_figure_rejects_bad_input(studies: dict, top: int, message: str) -> None:
    studies = {k: _effects() for k in studies}
    with pytest.raises(DesteinError, match=message):
        views.top_heads_figure(studies, top=top)


def test_dla_tokens_figure_bars_and_unique_readable_labels() -> None:
    dla = _dla()
    tokens = dla.top_tokens
    # Collisions and hard cases on head (1, 0): same string twice, whitespace, HTML, a number.
    tokens[1][0][0][:4] = ["▁the", "\n", "<b>", "2023"]
    tokens[1][0][1][:2] = ["▁the", ""]
    fig = views.dla_tokens_figure(dla, [(0, 1), (1, 0)])
    _assert_labelled(fig)
    assert len(fig.data) == 4
    assert [t.name for t in fig.data[:2]] == ["promoted by the detox move", "suppressed by the detox move"]
    assert [t.showlegend for t in fig.data] == [True, True, False, False]
    assert all(x > 0 for x in fig.data[0].x) and all(x < 0 for x in fig.data[1].x)
    assert list(fig.data[0].y) == ["t8", "t9", "t10", "t11"]  # ids of head (0, 1), side 0
    promoted, suppressed = fig.data[2].y, fig.data[3].y
    labels = list(promoted) + list(suppressed)
    assert len(set(labels)) == len(labels)
    assert list(promoted) == ["▁the (id 16)", "↵", "&lt;b&gt;", "2023"]
    assert list(suppressed[:2]) == ["▁the (id 20)", "∅"]
    assert fig.layout.yaxis2.type == "category"
    order = list(fig.layout.yaxis2.categoryarray)
    assert order[0] == "▁the (id 16)" and order[-1] == "▁the (id 20)"  # most promoted .. most suppressed
    assert fig.layout.annotations[0].text.startswith("L0H1")


def test_dla_tokens_figure_rejects_bad_input() -> None:
    dla = _dla()
    with pytest.raises(DesteinError, match="no heads"):
        views.dla_tokens_figure(dla, [])
    with pytest.raises(DesteinError, match="outside"):
        views.dla_tokens_figure(dla, [(N_LAYERS, 0)])
    # A result with inconsistent shapes is refused where it is made (or loaded), not in a view.
    with pytest.raises(DesteinError, match="top_ids"):
        DirectLogits(dla.effects, dla.top_ids, dla.top_logits[..., :2], dla.top_tokens, dla.direction_effect)
    with pytest.raises(DesteinError, match="direction_effect"):
        DirectLogits(dla.effects, dla.top_ids, dla.top_logits, dla.top_tokens, torch.zeros(2, 2))
    tokens = dla.top_tokens
    tokens[0][0][1] = tokens[0][0][1][:1]
    with pytest.raises(DesteinError, match="top_tokens"):
        _dla(tokens)


def test_selection_figure_lines_bands_and_random_reference() -> None:
    curves = _curves()
    fig = views.selection_figure(curves)
    _assert_labelled(fig)
    names = [t.name for t in fig.data]
    assert names == [
        "probe 95% band",
        "probe",
        "causal 95% band",
        "causal",
        "random-0",
        "random-1",
        "random-2",
        "random (mean of 3 seeds)",
    ]
    lines = {t.name: t for t in fig.data}
    mean = curves.mean().numpy()
    np.testing.assert_allclose(lines["probe"].y, mean[0], rtol=1e-6)
    np.testing.assert_allclose(lines["random (mean of 3 seeds)"].y, mean[2:].mean(0), rtol=1e-6)
    assert lines["random (mean of 3 seeds)"].line.dash == "dash"
    assert lines["random-1"].line.color == lines["random-2"].line.color != lines["probe"].line.color
    low, high = (t.numpy() for t in curves.interval())
    band = lines["probe 95% band"]
    np.testing.assert_allclose(band.y, np.concatenate([high[0], low[0][::-1]]), rtol=1e-6)
    assert (band.fill, band.mode) == ("toself", "lines")
    assert "95% CI" in lines["causal"].hovertemplate
    assert fig.layout.xaxis.type == "log"
    assert list(fig.layout.xaxis.ticktext) == ["1", "2", "4", "all (6)"]
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 4, 6]


def test_selection_figure_with_evaluation_panel() -> None:
    curves = _curves()
    evaluation = {
        "scorer": "toy",
        "config": {"seed": 0},
        "baseline": _summary(0.5),
        "probe-top4": _summary(0.3),
        "probe-top2": _summary(0.4),
        "random-0-top4": _summary(0.45),
        "unrelated-top4": _summary(0.1),
    }
    fig = views.selection_figure(curves, evaluation)
    _assert_labelled(fig)
    panel = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in panel] == ["probe (generations)", "random-0 (generations)"]
    probe = panel[0]
    assert list(probe.y) == [0.4, 0.3]  # sorted by k
    assert list(probe.customdata[:, 0]) == [2, 4]
    assert "TP" in probe.hovertemplate and "perplexity" in probe.hovertemplate
    np.testing.assert_allclose(probe.error_y.array, [0.05, 0.05])
    (line,) = fig.layout.shapes
    assert (line.y0, line.y1, line.xref) == (0.5, 0.5, "x2 domain")
    assert fig.layout.yaxis2.title.text == "expected max toxicity"
    assert fig.layout.xaxis2.type == "log" and fig.layout.xaxis2.matches == "x"


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [({"probe-top4": _summary(0.3)}, "baseline"), ({"baseline": _summary(0.5), "other-top2": {}}, "ranker")],
)
def test_selection_figure_rejects_unusable_evaluation(evaluation: dict, message: str) -> None:
    with pytest.raises(DesteinError, match=message):
        views.selection_figure(_curves(), evaluation)


def test_mismatched_selection_curves_are_refused_where_made() -> None:
    c = _curves()
    with pytest.raises(DesteinError, match="rankers"):
        SelectionCurves(c.rankers[:2], c.ks, c.effect, c.orders, c.alpha)
    with pytest.raises(DesteinError, match="increasing"):
        SelectionCurves(c.rankers, (1, 4, 2, 6), c.effect, c.orders, c.alpha)


def test_agreement_figure_annotates_intervals_and_nan() -> None:
    constant = torch.zeros(N_LAYERS, N_HEADS)  # no ranking at all: rho is undefined
    result = agreement({"patching": _effects(), "steering": _effects(seed=1), "flat": constant}, k=2)
    fig = views.agreement_figure(result)
    _assert_labelled(fig)
    rho, overlap = fig.data
    assert (rho.zmin, rho.zmax, overlap.zmin, overlap.zmax) == (-1.0, 1.0, 0.0, 1.0)
    assert list(rho.x) == ["patching", "steering", "flat"]
    assert fig.layout.annotations[1].text == "top-2 overlap"  # the panel titles come first
    cells = fig.layout.annotations[2:]
    assert len(cells) == 2 * 9
    by_cell = {(a.xref, a.y, a.x): a.text for a in cells}
    point, low, high = (float(t[0, 1]) for t in (result.spearman, result.spearman_low, result.spearman_high))
    assert by_cell[("x", "patching", "steering")] == f"{point:.2f}<br>[{low:.2f}, {high:.2f}]"
    assert by_cell[("x", "patching", "flat")] == "n/a"
    assert math.isnan(rho.z[0][2])
    assert by_cell[("x2", "patching", "patching")] == "1.00<br>[1.00, 1.00]"
    assert "95% CI" in overlap.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"


def test_mismatched_agreement_is_refused_where_made() -> None:
    m = torch.eye(2)
    with pytest.raises(DesteinError, match=r"\[3, 3\]"):
        Agreement(("a", "b", "c"), 2, m, m, m, m, m, m)
    with pytest.raises(DesteinError, match="at least one ranking"):
        Agreement((), 2, m, m, m, m, m, m)


def test_depth_figure_puts_models_on_relative_depth() -> None:
    studies = {"gemma": _effects(shape=(3, 2)), "smollm": _effects(seed=1, shape=(5, 2))}
    fig = views.depth_figure(studies)
    _assert_labelled(fig)
    assert [t.name for t in fig.data] == [
        "gemma: every head",
        "gemma: strongest head per layer (3 layers)",
        "smollm: every head",
        "smollm: strongest head per layer (5 layers)",
    ]
    heads, line = fig.data[2], fig.data[3]
    assert len(heads.x) == 10 and min(heads.x) == 0.0 and max(heads.x) == 1.0
    np.testing.assert_allclose(line.x, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(line.y, studies["smollm"].mean().max(1).values.numpy(), rtol=1e-6)
    low, _ = studies["smollm"].interval()
    np.testing.assert_allclose(heads.customdata[:, 2], low.flatten().numpy(), rtol=1e-6)
    assert "smollm" in heads.hovertemplate and "95% CI" in heads.hovertemplate
    assert fig.layout.xaxis.title.text.startswith("relative depth")
    # One layer: depth 0, not a division by zero.
    assert list(views.depth_figure({"one": _effects(shape=(1, 2))}).data[1].x) == [0.0]


def test_depth_figure_rejects_mixed_studies() -> None:
    with pytest.raises(DesteinError, match="no studies"):
        views.depth_figure({})
    with pytest.raises(DesteinError, match="one study"):
        views.depth_figure({"a": _effects("patching"), "b": _effects("steering")})
