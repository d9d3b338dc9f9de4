"""`make_figures`: every figure and the README, end to end on the tiny model; its input checks; the
analyses it draws (probe maps, sweep rows)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from destein_lens import DesteinError, figures
from destein_lens.analysis import load_sweep, method_families, plottable_sweep, probe_figures
from destein_lens.figures import FIGURES, check_figures_inputs, make_figures
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.vectors import build_vectors
from destein_lens.views.export import _RENDER_TRIES

HAVE_CHROMIUM = Path("/usr/bin/chromium").exists()


def test_make_figures_writes_every_figure(tiny_model, tmp_path) -> None:
    formats = ("html", "png") if HAVE_CHROMIUM else ("html",)
    paths = make_figures(tmp_path, model=tiny_model, quick=True, progress=False, formats=formats)
    for stem in FIGURES:
        for fmt in formats:
            path = tmp_path / f"{stem}.{fmt}"
            assert path in paths and path.stat().st_size > 0, path
    readme = (tmp_path / "README.md").read_text()
    assert "destein-lens figures" in readme and "--quick" in readme
    assert all(f"`{stem}`" in readme for stem in FIGURES)
    assert (tmp_path / "plotly.min.js").is_file()


METRICS = {"expected_max_toxicity": 0.2, "toxicity_probability": 0.1, "perplexity": 20.0}


def test_broken_browser_costs_the_pngs_not_the_html(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    """Chromium that closes as soon as it starts (kaleido's real error): every HTML, one line,
    one figure's tries."""
    import kaleido
    from kaleido.errors import BrowserFailedError

    calls = []

    def browser_closed(*args: object, **kwargs: object) -> bytes:
        calls.append(args)
        raise BrowserFailedError(
            "The browser seemed to close immediately after starting.",
            "You can set the `logging.Logger` level lower to see more output.",
        )

    monkeypatch.setattr(kaleido, "calc_fig_sync", browser_closed)
    paths = make_figures(tmp_path, model=tiny_model, quick=True, progress=False, formats=("html", "png"))
    for stem in FIGURES:
        assert tmp_path / f"{stem}.html" in paths and (tmp_path / f"{stem}.html").stat().st_size > 0
    assert not list(tmp_path.glob("*.png"))
    assert len(calls) == _RENDER_TRIES  # given up after the first figure's tries, not per figure
    lines = [line for line in capsys.readouterr().err.splitlines() if "static export" in line]
    assert lines == [
        "static export skipped, figures saved as HTML only: Chromium did not render "
        "(BrowserFailedError: The browser seemed to close immediately after starting.)"
    ]
    readme = (tmp_path / "README.md").read_text()
    assert "static export skipped" in readme and "<name>.png" not in readme


def test_probe_maps_star_the_heads_steer_picks(tiny_model) -> None:
    """Ties in accuracy (common: many heads reach 1.0) are broken as `vectors.ranking()` breaks them."""
    vectors = build_vectors(tiny_model, builtin_seed_pairs().head(10), k=4, progress=False)
    n_layers, n_heads, width = vectors.directions.shape
    # All heads tie on accuracy; direction norms grow with the index, so the ranking runs backwards.
    scale = torch.arange(1.0, n_layers * n_heads + 1).reshape(n_layers, n_heads, 1)
    tied = dataclasses.replace(
        vectors,
        accuracy_bare=torch.ones(n_layers, n_heads),
        directions=torch.ones(n_layers, n_heads, width) * scale,
    )
    assert tied.ranking()[:3] == [(1, 3), (1, 2), (1, 1)]
    for fig in probe_figures(tied, top_k=3):
        stars = fig.data[1]
        assert list(zip(stars.y, stars.x)) == tied.ranking()[:3]
        assert stars.name == "the top-3 heads steer(heads=3) picks"


def test_sweep_rows_group_into_method_families(tmp_path) -> None:
    rows = [
        {"method": "baseline", "alpha": 0.0, **METRICS},
        {"method": "destein_all_a0.4", "alpha": 0.4, **METRICS},
        {"method": "destein_top16_a1.0", "alpha": 1.0, **METRICS},
        {"method": "released_a0.3", "alpha": 0.3, **METRICS},
    ]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    families = [r["method"] for r in method_families(load_sweep(path))]
    assert families == ["baseline", "destein_all", "destein_top16", "released"]


def test_degenerate_sweep_rows_are_left_out_by_name() -> None:
    metrics = METRICS
    rows = [
        {"method": "baseline", "alpha": 0.0, **metrics},
        {"method": "destein_all", "alpha": 0.8, **metrics, "perplexity": float("nan")},
        {"method": "released", "alpha": 1.0, **metrics, "perplexity": None},
        {"method": "incomplete", "alpha": 0.1},  # missing columns stay for alpha_sweep to reject
    ]
    kept, left_out = plottable_sweep(rows)
    assert [r["method"] for r in kept] == ["baseline", "incomplete"]
    assert left_out == ["destein_all α=0.8", "released α=1.0"]


@pytest.mark.parametrize("content", ["{not json", '{"method": "baseline"}', "[1, 2]"])
def test_bad_sweep_files_are_user_errors(tmp_path, content: str) -> None:
    path = tmp_path / "sweep.json"
    path.write_text(content)
    with pytest.raises(DesteinError):
        load_sweep(path)
    with pytest.raises(DesteinError, match="not found"):
        load_sweep(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "non-empty JSON list"),
        ({"rows": []}, "JSON list"),
        ([{"method": "baseline", "alpha": 0.0}], "row 0 lacks expected_max_toxicity"),
        ([{"method": "a", "alpha": "0.1", **METRICS}], "non-numeric alpha"),
        ([{"method": "a", "alpha": None, **METRICS}], "non-numeric alpha"),
        ([{"method": "a", "alpha": 0.1, **METRICS, "perplexity": "high"}], "non-numeric perplexity"),
        ([{"method": "a", "alpha": 0.1, **METRICS, "toxicity_probability": True}], "toxicity_probability"),
        ([{"method": ["a"], "alpha": 0.1, **METRICS}], "non-string method"),
        ([{"method": "a", "alpha": 0.1, **METRICS, "perplexity": None}], "nothing to plot"),
    ],
)
def test_wrong_shape_sweeps_fail_in_one_line(tmp_path, rows: object, message: str) -> None:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DesteinError, match=message) as caught:
        check_figures_inputs(tmp_path / "out", path)
    assert "\n" not in str(caught.value)


def test_figures_inputs_accept_a_good_sweep_and_a_new_folder(tmp_path) -> None:
    rows = [
        {"method": "baseline", "alpha": 0, **METRICS},
        {"method": "destein_all_a0.8", "alpha": 0.8, **METRICS, "perplexity": float("nan")},  # left out later
    ]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    assert check_figures_inputs(tmp_path / "new" / "figures", path) == json.loads(path.read_text())
    assert check_figures_inputs(tmp_path) is None
    assert not (tmp_path / "new").exists()  # checked, not created


def test_figures_out_must_be_a_folder(tmp_path) -> None:
    (file := tmp_path / "figures.txt").write_text("not a folder")
    with pytest.raises(DesteinError, match="is a file"):
        check_figures_inputs(file)
    with pytest.raises(DesteinError, match="inside .*figures.txt, which is a file"):
        check_figures_inputs(file / "sub" / "figures")


def test_bad_sweep_fails_before_the_model_loads(tmp_path, monkeypatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        pytest.fail("make_figures loaded a model before checking its inputs")

    monkeypatch.setattr(figures, "load_model", no_model)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps([{"method": "baseline"}]))
    with pytest.raises(DesteinError, match="lacks alpha"):
        make_figures(tmp_path / "out", sweep_json=path, progress=False)
    assert not (tmp_path / "out").exists()
