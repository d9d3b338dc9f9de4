"""Writing figures to disk: interactive HTML sharing one plotly.js, and static images via kaleido.

Static export runs a headless Chromium, the one part of a figure's life that can fail for reasons
outside the figure (no browser, a browser that dies on start). It fails as `StaticExportError`,
so callers that can live with HTML alone (`destein-lens figures`) catch exactly that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..errors import DesteinError
from ..files import write_atomic

STATIC_FORMATS = ("png", "svg", "pdf")


class StaticExportError(DesteinError):
    """PNG/SVG/PDF could not be rendered (no kaleido, no Chromium, or Chromium failed); HTML still can.

    `reason` is the cause alone, for callers that go on without static images and say why.
    """

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"static export failed, {reason}: {fix}")
        self.reason = reason


def _reason(exc: BaseException) -> str:
    """One line from a browser error: choreographer packs a paragraph into several args."""
    text = str(exc.args[0]).strip() if exc.args else ""
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# A loaded machine sometimes makes kaleido call into its page before the page's scripts ran
# ("ReferenceError: kaleido_scopes is not defined"); a fresh browser then renders the same figure.
_RENDER_TRIES = 3


def _static_image(fig: go.Figure, fmt: str, scale: float) -> bytes:
    """Render with kaleido's headless Chromium; MathJax off so nothing is fetched from a CDN."""
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        raise StaticExportError("kaleido is not installed", "pip install 'kaleido>=1.0'") from None
    opts = {
        "format": fmt,
        "width": fig.layout.width or 1000,
        "height": fig.layout.height or 600,
        "scale": scale,
    }
    failure: Exception | None = None
    for _ in range(_RENDER_TRIES):
        try:
            return kaleido.calc_fig_sync(fig, opts=opts, kopts={"mathjax": False})
        except ChromeNotFoundError:
            raise StaticExportError(
                "Chromium was not found",
                "apt-get install chromium (or set BROWSER_PATH), or save with formats=('html',)",
            ) from None
        except Exception as exc:  # a browser that will not start or dies fails in many types, all alike
            failure = exc
    raise StaticExportError(
        f"Chromium did not render ({_reason(failure)})", "save with formats=('html',)"
    ) from failure


def save_figure(
    fig: go.Figure,
    out_dir: str | os.PathLike[str],
    stem: str,
    *,
    formats: Sequence[str] = ("html", "png"),
    scale: float = 2.0,
) -> list[Path]:
    """Write ``stem.<format>`` for each format into ``out_dir``; return the paths.

    HTML does not embed plotly.js (4.8 MB each): one shared ``plotly.min.js`` is written
    beside it and refreshed when plotly is upgraded, so figures open offline. Static formats
    (png, svg, pdf) go through kaleido and raise `StaticExportError` when it fails. Everything
    is rendered before anything is written, and each file is replaced atomically.
    """
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise DesteinError(f"stem must be a plain file name without directories, got {stem!r}")
    wanted = [f.lower().lstrip(".") for f in formats]
    unknown = sorted(set(wanted) - {"html", *STATIC_FORMATS})
    if unknown or not wanted:
        raise DesteinError(
            f"formats must be drawn from html, {', '.join(STATIC_FORMATS)}; got {list(formats)}"
        )
    out = Path(out_dir)
    rendered: dict[str, bytes] = {}
    for fmt in dict.fromkeys(wanted):
        if fmt == "html":
            rendered[fmt] = fig.to_html(include_plotlyjs="directory", full_html=True).encode("utf-8")
        else:
            rendered[fmt] = _static_image(fig, fmt, scale)
    out.mkdir(parents=True, exist_ok=True)
    if "html" in rendered:
        bundle = out / "plotly.min.js"
        js = get_plotlyjs().encode("utf-8")
        if not bundle.is_file() or bundle.read_bytes() != js:
            write_atomic(bundle, js)
    paths = []
    for fmt, data in rendered.items():
        path = out / f"{stem}.{fmt}"
        write_atomic(path, data)
        paths.append(path)
    return paths
