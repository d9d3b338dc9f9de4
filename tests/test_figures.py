"""`make_figures`: every figure and the README, end to end on the tiny model; the sweep file reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from destein_lens import DesteinError
from destein_lens.figures import FIGURES, load_sweep, make_figures, method_families, plottable_sweep

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


def test_sweep_rows_group_into_method_families(tmp_path) -> None:
    rows = [
        {"method": "baseline", "alpha": 0.0},
        {"method": "destein_all_a0.4", "alpha": 0.4},
        {"method": "destein_top16_a1.0", "alpha": 1.0},
        {"method": "released_a0.3", "alpha": 0.3},
    ]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(rows))
    families = [r["method"] for r in method_families(load_sweep(path))]
    assert families == ["baseline", "destein_all", "destein_top16", "released"]


def test_degenerate_sweep_rows_are_left_out_by_name() -> None:
    metrics = {"expected_max_toxicity": 0.2, "toxicity_probability": 0.1, "perplexity": 20.0}
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
