"""Saved figures really render: headless Chromium opens each HTML file offline.

The structural tests in test_views.py cannot see a figure that plotly.js refuses to draw
(a bad property, a missing plotly.min.js, a CDN link that fails offline). Here Debian's
Chromium, driven by Playwright (never its own downloaded browsers), loads every figure over
file://, and the page must draw a plot, log no errors, fetch nothing from the network and
not screenshot as a single colour. Kaleido's static export uses the same Chromium.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from destein_lens import views

CHROMIUM = Path("/usr/bin/chromium")
# Offline and reproducible: no GPU, QUIC, sync, component updates or first-run UI.
# Playwright itself adds --enable-unsafe-swiftshader, so scatter3d still gets (software) WebGL.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_FIGURES = sorted((Path(__file__).resolve().parents[1] / "figures").glob("*.html"))

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
Image = pytest.importorskip("PIL.Image", reason="needs pillow to inspect screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One headless Chromium with a fresh profile for the whole module."""
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 800},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One HTML file per kind of view, saved the way users save them."""
    rng = np.random.default_rng(0)
    toxic = rng.normal(size=(30, 8)) + 2 * np.eye(8)[0]
    nontoxic = rng.normal(size=(30, 8))
    direction = toxic.mean(0) - nontoxic.mean(0)
    keys = ("method", "alpha", "perplexity", "expected_max_toxicity", "toxicity_probability")
    sweep = [dict(zip(keys, ("destein", a, 20 + 2 * a, 0.5 - 0.08 * a, 0.4 - 0.07 * a))) for a in range(4)]
    figures = {
        "probe": views.probe_heatmap(rng.uniform(0.5, 1, (6, 8)), marked=[(0, 1), (2, 3), (5, 7)]),
        "geometry": views.activation_geometry(
            toxic, nontoxic, direction=direction, steered=toxic - direction
        ),
        "geometry3d": views.activation_geometry(toxic, nontoxic, direction=direction, dims=3),
        "heads": views.top_heads_geometry([("L1H2", toxic, nontoxic, direction)] * 2),
        "sweep": views.alpha_sweep(sweep),
        "table": views.generation_table(
            [
                {
                    "prompt": "So he said <|endoftext|>",
                    "baseline": "something rude",
                    "steered": "something kind",
                    "baseline_toxicity": 0.9,
                    "steered_toxicity": 0.1,
                }
            ]
        ),
    }
    out = tmp_path_factory.mktemp("figures")
    return {name: views.save_figure(fig, out, name, formats=("html",))[0] for name, fig in figures.items()}


def _render(browser: object, path: Path) -> tuple[object, bytes]:
    """Open ``path``, wait for plotly to draw, and check the page stayed clean and offline."""
    page = browser.new_page()
    errors: list[str] = []
    remote: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url.startswith(("file:", "data:", "blob:")) else remote.append(r.url),
    )
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_selector(".plotly-graph-div .main-svg", timeout=20_000)
    box = page.locator(".plotly-graph-div .main-svg").first.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100
    page.wait_for_timeout(300)  # let late errors (deferred plotly work) surface
    screenshot = page.screenshot(full_page=True)
    assert errors == [], f"console errors in {path.name}: {errors}"
    assert remote == [], f"{path.name} reached for the network: {remote}"
    return page, screenshot


def _assert_not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    dominant = max(count for count, _ in colours)
    assert len(colours) > 1 and dominant < 0.99 * image.width * image.height, "blank render"


@pytest.mark.parametrize("name", ["probe", "geometry", "geometry3d", "heads", "sweep", "table"])
def test_saved_figure_renders(browser: object, saved: dict[str, Path], name: str) -> None:
    page, screenshot = _render(browser, saved[name])
    _assert_not_blank(screenshot)
    if name == "geometry3d":
        assert page.locator(".plotly-graph-div .gl-container canvas").count() > 0
    if name == "table":  # generated text with '<' survives as text, not markup
        assert "<|endoftext|>" in page.text_content(".plotly-graph-div")
    page.close()


@pytest.mark.parametrize("path", REPO_FIGURES, ids=[p.name for p in REPO_FIGURES])
def test_repo_figure_renders(browser: object, path: Path) -> None:
    page, screenshot = _render(browser, path)
    _assert_not_blank(screenshot)
    page.close()


def test_static_export_through_kaleido(tmp_path: Path) -> None:
    fig = views.probe_heatmap(np.linspace(0.5, 1, 12).reshape(3, 4), marked=[(2, 3), (2, 2)])
    png, svg = views.save_figure(fig, tmp_path, "probe", formats=("png", "svg"), scale=1)
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1000, fig.layout.height)
    _assert_not_blank(png.read_bytes())
    text = svg.read_text()
    assert text.lstrip().startswith("<svg") and "held-out probe accuracy" in text
