"""The explorer as a researcher uses it: JupyterLab in headless Chromium, notebook 06 run from the
Run menu, a head clicked on the map, the strength slider dragged, and the page read back.

JupyterLab serves a copy of the notebook (its outputs never reach the checkout) from a scratch
folder beside a link to the shared data, so the notebook finds the RealToxicityPrompts examples
as it does in the checkout. Chromium is Debian's (never Playwright's own download). The page's
screenshot is saved as figures/explorer.png.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_browser import CHROMIUM, CHROMIUM_FLAGS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_explore.ipynb"
SCREENSHOT = ROOT / "figures" / "explorer.png"
# Model load, vectors and the first request, on 2 busy cores; the whole test takes about a minute idle.
NOTEBOOK_S = 600
_RAN = re.compile(r"\[(\*|\d+)\]")  # a cell's prompt once it is queued or has run
REQUEST_S = 180

pytestmark = pytest.mark.real
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        except sync_api.Error as e:
            pytest.skip(f"Chromium cannot start here: {str(e).splitlines()[0]}")
        yield browser.new_page(viewport={"width": 1400, "height": 1800})  # the whole explorer in view
        browser.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """JupyterLab on localhost over a scratch copy of the notebook; yields the notebook's URL."""
    scratch = tmp_path_factory.mktemp("lab")
    (scratch / "main" / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, scratch / "main" / "notebooks" / NOTEBOOK.name)
    if (ROOT.parent / "shared").is_dir():
        (scratch / "shared").symlink_to(ROOT.parent / "shared")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(scratch / "runtime"))
    env |= {
        "JUPYTERLAB_SETTINGS_DIR": str(scratch / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(scratch / "ws"),
    }
    log = scratch / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={scratch}",
         "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip

    def started() -> bool:
        assert server.poll() is None, f"JupyterLab exited: {log.read_text()[-2000:]}"
        return _answers(f"http://127.0.0.1:{port}/api/status?token={token}")

    try:
        _until(started, 120, "JupyterLab to start")
        yield f"http://127.0.0.1:{port}/lab/tree/main/notebooks/{NOTEBOOK.name}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_click_a_head_and_drag_the_strength(page, lab: str) -> None:
    page.goto(lab)
    page.wait_for_selector("text=/ipykernel\\) \\| Idle/", timeout=120_000)  # the kernel is connected
    for _ in range(3):  # a click while the page still settles can be lost: until the first cell runs
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        if _until(lambda: page.locator(".jp-InputPrompt", has_text=_RAN).count() > 0, 20, None):
            break
    # the last cell prints the status and the code once the explorer's first request is done
    printed = ".jp-RenderedText:has-text('steered = generate(model, [prompt], sampling)[0]')"
    page.wait_for_selector(printed, state="attached", timeout=NOTEBOOK_S * 1000)
    assert "done" in _status(page)
    if page.get_by_role(
        "button", name="No", exact=True
    ).count():  # JupyterLab's news question covers the page
        page.get_by_role("button", name="No", exact=True).first.click()

    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    layer, head, starred = page.evaluate(_UNSTARRED)  # a head the notebook does not steer yet
    unsteered = _texts(page, "unsteered")
    x, y = page.evaluate(_CELL_CENTRE, [layer, head])
    page.mouse.move(x, y)
    page.wait_for_timeout(300)  # plotly takes the click's point from the hover
    page.mouse.click(x, y)
    _until(
        lambda: f"{starred + 1} heads" in _header(page) and "done" in _status(page), REQUEST_S, "the click"
    )
    assert f"({layer}, {head})" in _code(page)
    clicked = _texts(page, "steered")

    handle = page.locator(".widget-slider:has(label:text-is('strength')) .noUi-handle").first
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y, steps=8)
    page.mouse.up()
    _until(lambda: "strength 0.1," not in _header(page) and "done" in _status(page), REQUEST_S, "the slider")
    assert _texts(page, "steered") != clicked, "the steered continuation did not change with the strength"
    assert f"({layer}, {head})" in _code(page) and "alpha=0.1," not in _code(page)
    assert _texts(page, "unsteered") == unsteered  # same prompt and seed: the unsteered side stays
    explorer = page.locator(".jp-OutputArea-output .widget-vbox").first
    explorer.scroll_into_view_if_needed()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    explorer.screenshot(path=str(SCREENSHOT))


# Page reads: the widget's own DOM (text content: JupyterLab skips rendering cells out of view).
_UNSTARRED = """() => {
  const gd = document.querySelector('.js-plotly-plot');
  const [map, starred] = gd._fullData;  // decoded: `data` may hold the widget's binary arrays
  const stars = new Set(Array.from(starred.x, (h, i) => `${starred.y[i]},${h}`));
  const [layers, heads] = [map.z.length, map.z[0].length];
  for (let l = 0; l < layers; l++)
    for (let h = 0; h < heads; h++) if (!stars.has(`${l},${h}`)) return [l, h, stars.size];
}"""
_CELL_CENTRE = """([layer, head]) => {
  const gd = document.querySelector('.js-plotly-plot');
  const box = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  return [box.left + xa._offset + xa.l2p(head), box.top + ya._offset + ya.l2p(layer)];
}"""


def _texts(page, side: str) -> list[str]:
    return page.eval_on_selector_all(
        f"td.destein-{side} .destein-text", "cells => cells.map(c => c.textContent)"
    )


def _code(page) -> str:
    return page.text_content("pre.destein-code")


def _header(page) -> str:
    return page.text_content("table.destein-contrast tr >> nth=0")


def _status(page) -> str:
    return page.eval_on_selector_all(
        ".widget-label",
        "labels => labels.map(l => l.textContent).filter(t => t.startsWith('done')).join(' ')",
    )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _until(ready: Callable[[], bool], seconds: float, what: str | None) -> bool:
    """Poll `ready` for up to `seconds`; on timeout fail, naming `what`, or return False without one."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            if what is None:
                return False
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.5)
    return True
