"""Figures built from small synthetic arrays: structure, labels and the numbers they show."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from destein_lens import views
from destein_lens.errors import DesteinError


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _classes(n: int = 20, d: int = 8, shift: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng()
    nontoxic = rng.normal(size=(n, d))
    toxic = rng.normal(size=(n, d)) + shift * np.eye(d)[0]
    return toxic, nontoxic


def _assert_labelled(fig: go.Figure) -> None:
    """The contract every view keeps: title, shared template, titled axes."""
    assert fig.layout.title.text
    assert fig.layout.template == pio.templates[views.TEMPLATE]
    axes = [k for k in fig.layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]
    for name in axes:
        assert fig.layout[name].title.text, f"{name} has no title"


def test_head_grid_labels_hover_and_markers() -> None:
    values = _rng().normal(size=(4, 6))
    fig = views.head_grid(
        values,
        title="Head attribution",
        colorbar_title="Δ toxicity",
        hover={"probe accuracy": np.full((4, 6), 0.7)},
        marked=[(0, 5), (3, 0)],
        zmid=0.0,
    )
    _assert_labelled(fig)
    heatmap, marks = fig.data
    assert (heatmap.type, marks.type) == ("heatmap", "scatter")
    assert heatmap.colorbar.title.text == "Δ toxicity"
    assert heatmap.zmid == 0.0
    assert heatmap.customdata.shape == (4, 6, 1)
    assert "probe accuracy" in heatmap.hovertemplate
    assert list(zip(marks.y, marks.x)) == [(0, 5), (3, 0)]
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("head", "layer")
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickmode == "linear"
    assert tuple(fig.layout.yaxis.range) == (3.5, -0.5)  # layer 0 on top


def test_head_grid_accepts_torch_and_rejects_bad_input() -> None:
    fig = views.head_grid(torch.ones(2, 3, dtype=torch.bfloat16), title="t", colorbar_title="c")
    assert len(fig.data) == 1 and np.asarray(fig.data[0].z).shape == (2, 3)
    with pytest.raises(DesteinError, match="outside"):
        views.head_grid(np.ones((2, 3)), title="t", colorbar_title="c", marked=[(2, 0)])
    with pytest.raises(DesteinError, match="shape"):
        views.head_grid(np.ones((2, 3)), title="t", colorbar_title="c", hover={"x": np.ones((3, 2))})
    with pytest.raises(DesteinError, match="2-D"):
        views.head_grid(np.ones(3), title="t", colorbar_title="c")


def test_probe_heatmap_stars_exactly_the_heads_it_is_given() -> None:
    accuracy = np.full((4, 5), 0.6)
    accuracy[1, 2], accuracy[3, 0], accuracy[0, 4] = 0.99, 0.95, 0.9
    # Not the accuracy order: the stars are the caller's (steer's) heads, never a ranking of its own.
    steered = [(3, 0), (0, 4), (1, 2)]
    fig = views.probe_heatmap(accuracy, direction_norm=np.arange(20.0).reshape(4, 5), marked=steered)
    _assert_labelled(fig)
    heatmap, marks = fig.data
    assert heatmap.colorbar.title.text == "held-out probe accuracy"
    assert (heatmap.zmin, heatmap.zmax) == (0.5, 1.0)
    assert "direction norm" in heatmap.hovertemplate
    assert np.asarray(heatmap.customdata)[3, 0, 0] == 15.0
    assert list(zip(marks.y, marks.x)) == steered
    assert "top-3" in marks.name and "steer(heads=3)" in marks.name
    relabelled = views.probe_heatmap(accuracy, marked=steered[:1], marked_label="my heads")
    assert relabelled.data[1].name == "my heads"


def test_probe_heatmap_input_errors() -> None:
    assert len(views.probe_heatmap(np.full((2, 2), 0.7)).data) == 1
    with pytest.raises(DesteinError, match="percentages"):
        views.probe_heatmap(np.full((2, 2), 70.0))
    with pytest.raises(DesteinError, match="outside"):
        views.probe_heatmap(np.full((2, 2), 0.7), marked=[(0, 2)])


def test_activation_geometry_pca_arrow_lands_on_toxic_centroid() -> None:
    toxic, nontoxic = _classes()
    direction = toxic.mean(0) - nontoxic.mean(0)
    fig = views.activation_geometry(toxic, nontoxic, direction=direction, steered=toxic - direction)
    _assert_labelled(fig)
    by_name = {t.name: t for t in fig.data}
    assert [t.type for t in fig.data] == ["scatter"] * 4
    assert set(by_name) == {"toxic", "non-toxic", "steered (after)", "detox direction"}
    arrow = by_name["detox direction"]
    start, end = np.c_[arrow.x, arrow.y]
    np.testing.assert_allclose(start, np.c_[by_name["non-toxic"].x, by_name["non-toxic"].y].mean(0))
    np.testing.assert_allclose(end, np.c_[by_name["toxic"].x, by_name["toxic"].y].mean(0))
    # Steering by the direction moves the toxic cloud onto the non-toxic centroid.
    steered = np.c_[by_name["steered (after)"].x, by_name["steered (after)"].y]
    np.testing.assert_allclose(steered.mean(0), start, atol=1e-9)
    assert "PC1" in fig.layout.xaxis.title.text and "PCA" in fig.layout.title.text


def test_activation_geometry_3d_uses_scatter3d() -> None:
    toxic, nontoxic = _classes()
    fig = views.activation_geometry(
        torch.tensor(toxic),
        torch.tensor(nontoxic),
        direction=toxic.mean(0) - nontoxic.mean(0),
        dims=3,
    )
    assert [t.type for t in fig.data] == ["scatter3d"] * 3
    assert fig.data[-1].name == "detox direction"
    scene = fig.layout.scene
    assert all(axis.title.text for axis in (scene.xaxis, scene.yaxis, scene.zaxis))


def test_activation_geometry_tsne_small_n_omits_direction() -> None:
    toxic, nontoxic = _classes(n=3, d=5)  # 9 points with steered: perplexity must be clipped
    fig = views.activation_geometry(toxic, nontoxic, direction=np.ones(5), steered=nontoxic, method="tsne")
    _assert_labelled(fig)
    assert [t.name for t in fig.data] == ["toxic", "non-toxic", "steered (after)"]
    assert [len(t.x) for t in fig.data] == [3, 3, 3]
    assert "not drawn" in fig.layout.title.subtitle.text
    assert "t-SNE" in fig.layout.xaxis.title.text
    fig3 = views.activation_geometry(toxic, nontoxic, method="tsne", dims=3)
    assert [t.type for t in fig3.data] == ["scatter3d"] * 2
    assert not fig3.layout.title.subtitle.text
    with pytest.raises(DesteinError, match="at least 3 points and 3 features"):
        views.activation_geometry(np.ones((2, 2)), np.ones((2, 2)), method="tsne", dims=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "umap"}, "method"),
        ({"dims": 4}, "dims"),
        ({"direction": np.ones(3)}, "dimension"),
        ({"steered": np.ones((2, 3))}, "dimension"),
    ],
)
def test_activation_geometry_rejects_bad_requests(kwargs: dict, message: str) -> None:
    toxic, nontoxic = _classes(n=4, d=6)
    with pytest.raises(DesteinError, match=message):
        views.activation_geometry(toxic, nontoxic, **kwargs)


def test_top_heads_geometry_grid() -> None:
    toxic, nontoxic = _classes()
    direction = toxic.mean(0) - nontoxic.mean(0)
    heads = [(f"L{i}H{i}", toxic, nontoxic, direction) for i in range(4)]
    heads[3] = ("L3H3", toxic, nontoxic, None)
    fig = views.top_heads_geometry(heads, cols=3)
    _assert_labelled(fig)
    assert [a.text for a in fig.layout.annotations] == ["L0H0", "L1H1", "L2H2", "L3H3"]
    assert len(fig.data) == 3 * 3 + 2
    assert sum(t.name == "detox direction" for t in fig.data) == 3
    assert sum(bool(t.showlegend) for t in fig.data) == 3  # each role listed once
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3", "x4"}
    with pytest.raises(DesteinError, match="empty"):
        views.top_heads_geometry([])


# (method, alpha, perplexity, EMT, TP); EMT front: A B E, TP front: A C F.
SWEEP = [
    ("baseline", 0.0, 10.0, 0.50, 0.40),  # A
    ("destein", 1.0, 12.0, 0.30, 0.35),  # B
    ("actadd", 1.0, 12.0, 0.40, 0.20),  # C
    ("actadd", 2.0, 15.0, 0.30, 0.30),  # D
    ("destein", 2.0, 20.0, 0.10, 0.25),  # E
    ("destein", 3.0, 25.0, 0.20, 0.05),  # F
]


def _sweep_rows() -> list[dict]:
    keys = ("method", "alpha", "perplexity", "expected_max_toxicity", "toxicity_probability")
    return [dict(zip(keys, row)) for row in SWEEP]


def test_alpha_sweep_pareto_front() -> None:
    fig = views.alpha_sweep(_sweep_rows())
    _assert_labelled(fig)
    fronts = [t for t in fig.data if t.name == "Pareto front"]
    assert len(fronts) == 2 and len(fig.data) == 2 + 2 * 3
    emt, tp = sorted(fronts, key=lambda t: t.xaxis)
    assert list(zip(emt.x, emt.y)) == [(10.0, 0.50), (12.0, 0.30), (20.0, 0.10)]
    assert list(zip(tp.x, tp.y)) == [(10.0, 0.40), (12.0, 0.20), (25.0, 0.05)]
    destein = next(t for t in fig.data if t.name == "destein")
    assert list(destein.text) == ["α=1", "α=2", "α=3"]
    assert [t.name for t in fig.data if t.showlegend] == [
        "Pareto front",
        "baseline",
        "destein",
        "actadd",
    ]
    assert "perplexity" in fig.layout.xaxis.title.text
    assert "expected maximum toxicity" in fig.layout.yaxis.title.text
    assert "toxicity probability" in fig.layout.yaxis2.title.text


def test_alpha_sweep_rejects_incomplete_rows() -> None:
    rows = _sweep_rows()
    del rows[2]["perplexity"]
    with pytest.raises(DesteinError, match="row 2 lacks perplexity"):
        views.alpha_sweep(rows)
    rows = _sweep_rows()
    rows[0]["perplexity"] = None
    with pytest.raises(DesteinError, match="perplexity"):
        views.alpha_sweep(rows)
    with pytest.raises(DesteinError, match="no sweep rows"):
        views.alpha_sweep([])


def test_generation_table_escapes_and_shades() -> None:
    rows = [
        {
            "prompt": "He said <|endoftext|>",
            "baseline": "line one\nline two",
            "steered": "fine",
            "baseline_toxicity": 0.81,
            "steered_toxicity": 0.02,
        }
    ]
    fig = views.generation_table(rows)
    assert fig.layout.title.text
    (table,) = fig.data
    assert table.type == "table"
    prompt, baseline, _, base_tox, steer_tox = (list(col) for col in table.cells.values)
    assert prompt == ["He said &lt;|endoftext|&gt;"] and baseline == ["line one<br>line two"]
    assert (base_tox, steer_tox) == (["0.810"], ["0.020"])
    fills = table.cells.fill.color
    assert fills[3][0] != "white" and fills[4][0] == "white"
    with pytest.raises(DesteinError, match="lacks steered"):
        views.generation_table([{k: v for k, v in rows[0].items() if k != "steered"}])


def test_save_figure_html_shares_one_plotly_bundle(tmp_path) -> None:
    fig = views.probe_heatmap(np.full((3, 3), 0.8), marked=[(0, 0)])
    (bundle := tmp_path / "plotly.min.js").write_text("stale")
    paths = views.save_figure(fig, tmp_path / "figs", "probe", formats=("html",))
    assert paths == [tmp_path / "figs" / "probe.html"]
    html = paths[0].read_text()
    assert 'src="plotly.min.js"' in html and len(html) < 100_000
    out = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert out == ["plotly.min.js", "probe.html"]  # no temp files left behind
    assert (tmp_path / "figs" / "plotly.min.js").stat().st_size > 1_000_000
    assert paths[0].stat().st_mode & 0o777 == 0o644
    views.save_figure(fig, tmp_path, "probe", formats=["HTML"])
    assert bundle.read_text() != "stale"  # an outdated bundle is replaced


def test_save_figure_writes_nothing_when_rendering_fails(tmp_path, monkeypatch) -> None:
    def fail(*args: object) -> bytes:
        raise DesteinError("no browser")

    monkeypatch.setattr(views.export, "_static_image", fail)
    with pytest.raises(DesteinError, match="no browser"):
        views.save_figure(go.Figure(), tmp_path, "f", formats=("html", "png"))
    assert list(tmp_path.iterdir()) == []


def test_browser_that_dies_on_start_is_a_static_export_error(tmp_path, monkeypatch) -> None:
    """Kaleido's error when Chromium starts and exits at once (a paragraph in several args) -> one line."""
    import kaleido
    from kaleido.errors import BrowserFailedError

    def browser_closed(*args: object, **kwargs: object) -> bytes:
        raise BrowserFailedError(
            "The browser seemed to close immediately after starting.",
            "You can set the `logging.Logger` level lower to see more output.",
        )

    monkeypatch.setattr(kaleido, "calc_fig_sync", browser_closed)
    with pytest.raises(views.StaticExportError) as caught:
        views.save_figure(go.Figure(), tmp_path, "f", formats=("html", "png"))
    assert isinstance(caught.value, DesteinError)
    assert caught.value.reason == (
        "Chromium did not render "
        "(BrowserFailedError: The browser seemed to close immediately after starting.)"
    )
    assert "\n" not in str(caught.value) and "formats=('html',)" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_render_that_fails_once_is_tried_again(tmp_path, monkeypatch) -> None:
    """On a loaded machine kaleido can call into its page before the page's scripts ran (seen in
    CI: "ReferenceError: kaleido_scopes is not defined"); the next try renders the figure."""
    import kaleido

    calls = []

    def flaky(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return b"\x89PNG"

    monkeypatch.setattr(kaleido, "calc_fig_sync", flaky)
    (path,) = views.save_figure(go.Figure(), tmp_path, "f", formats=("png",))
    assert path.read_bytes() == b"\x89PNG" and len(calls) == 2


@pytest.mark.parametrize(
    ("stem", "formats"), [("../up", ("html",)), ("a/b", ("html",)), ("ok", ("gif",)), ("ok", ())]
)
def test_save_figure_rejects_bad_names(tmp_path, stem: str, formats: tuple) -> None:
    with pytest.raises(DesteinError):
        views.save_figure(go.Figure(), tmp_path, stem, formats=formats)
