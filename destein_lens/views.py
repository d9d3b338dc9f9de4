"""Plotly figures for DeStein analyses: head grids, probe maps, activation geometry, sweeps.

Every function takes plain arrays (numpy or torch) rather than package objects, so figures
can be rebuilt from saved results in a notebook without a model in memory. All figures share
one template and always carry a title, axis titles and a named colour scale, because they
end up in papers and slides where an unlabelled axis is a question nobody can answer.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from destein_lens.errors import DesteinError
from destein_lens.files import write_atomic

TEMPLATE = "plotly_white"
# One colour per role across every figure, so "toxic" looks the same in all of them.
COLORS = {
    "toxic": "#d62728",
    "nontoxic": "#1f77b4",
    "steered": "#9467bd",
    "direction": "#111111",
}
# Toxicity at or above this counts as toxic for Toxicity Probability (Gehman et al. 2020).
TOXIC_THRESHOLD = 0.5
SWEEP_KEYS = ("method", "alpha", "expected_max_toxicity", "toxicity_probability", "perplexity")
GENERATION_KEYS = ("prompt", "baseline", "steered", "baseline_toxicity", "steered_toxicity")
STATIC_FORMATS = ("png", "svg", "pdf")


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    """Accept numpy arrays, lists or torch tensors (any device, any float dtype) as float."""
    if hasattr(x, "detach"):  # torch without importing torch; .float() handles bfloat16
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=float)
    if arr.ndim != ndim:
        raise DesteinError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise DesteinError(f"{name} is empty")
    return arr


def _finish(fig: go.Figure, title: str, subtitle: str | None = None) -> go.Figure:
    """Apply the shared template and title; the one place figure-wide style is set."""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "subtitle": {"text": subtitle} if subtitle else None, "x": 0.02},
        font={"size": 13},
    )
    return fig


def _int_axis(n: int) -> dict[str, Any]:
    """Integer ticks readable for 12 or 48 layers/heads; range pinned so markers can't pad it."""
    return {
        "tickmode": "linear",
        "tick0": 0,
        "dtick": max(1, math.ceil(n / 24)),
        "range": [-0.5, n - 0.5],
        "showgrid": False,
        "zeroline": False,
    }


def head_grid(
    values: Any,
    *,
    title: str,
    colorbar_title: str,
    hover: Mapping[str, Any] | None = None,
    marked: Sequence[tuple[int, int]] | None = None,
    marked_label: str = "marked heads",
    zmid: float | None = None,
    zrange: tuple[float, float] | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """Layer x head heatmap (layer 0 at the top, as the [L, H] array prints).

    ``hover`` adds named [L, H] arrays to each cell's tooltip; ``marked`` (layer, head)
    pairs get a star so selected heads stand out whatever the colour. Without an explicit
    ``colorscale`` a diverging one is used when ``zmid`` is set (signed attributions), a
    sequential one otherwise.
    """
    z = _array(values, "values", 2)
    n_layers, n_heads = z.shape
    names = list(hover or {})
    extra = [_array(hover[k], f"hover[{k!r}]", 2) for k in names] if hover else []
    for name, arr in zip(names, extra):
        if arr.shape != z.shape:
            raise DesteinError(f"hover[{name!r}] has shape {arr.shape}, values has {z.shape}")
    lines = ["layer %{y}, head %{x}", f"{colorbar_title}: %{{z:.4g}}"]
    lines += [f"{name}: %{{customdata[{i}]:.4g}}" for i, name in enumerate(names)]
    zmin, zmax = zrange if zrange else (None, None)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.arange(n_heads),
            y=np.arange(n_layers),
            customdata=np.stack(extra, axis=-1) if extra else None,
            hovertemplate="<br>".join(lines) + "<extra></extra>",
            colorscale=colorscale or ("RdBu_r" if zmid is not None else "Viridis"),
            zmid=zmid,
            zmin=zmin,
            zmax=zmax,
            colorbar={"title": {"text": colorbar_title, "side": "right"}},
            name=colorbar_title,
        )
    )
    if marked:
        cells = [(int(layer), int(head)) for layer, head in marked]
        for layer, head in cells:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise DesteinError(
                    f"marked head (layer {layer}, head {head}) is outside the {n_layers} x {n_heads} grid"
                )
        fig.add_trace(
            go.Scatter(
                x=[h for _, h in cells],
                y=[layer for layer, _ in cells],
                mode="markers",
                marker={
                    "symbol": "star",
                    "size": 13,
                    "color": "white",
                    "line": {"color": "black", "width": 1.5},
                },
                name=marked_label,
                hovertemplate="layer %{y}, head %{x}<extra>" + marked_label + "</extra>",
            )
        )
    fig.update_xaxes(title_text="head", **_int_axis(n_heads))
    y_axis = _int_axis(n_layers)
    y_axis["range"] = y_axis["range"][::-1]  # layer 0 at the top
    fig.update_yaxes(title_text="layer", **y_axis)
    fig.update_layout(
        height=int(np.clip(140 + 26 * n_layers, 380, 950)),
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1.0, "xanchor": "right"},
    )
    return _finish(fig, title)


def probe_heatmap(
    accuracy: Any,
    *,
    direction_norm: Any | None = None,
    top_k: int | None = None,
    title: str = "Per-head probe accuracy: toxic vs non-toxic",
) -> go.Figure:
    """Held-out probe accuracy per head, the quantity DeStein uses to pick and weight heads.

    The scale starts at 0.5 (chance for balanced classes) so near-chance heads all look
    alike; the top-k heads by accuracy (ties: lower layer/head first) are starred.
    """
    acc = _array(accuracy, "accuracy", 2)
    if np.nanmin(acc) < 0 or np.nanmax(acc) > 1:
        raise DesteinError("accuracy must be fractions in [0, 1] (not percentages)")
    marked, label = None, ""
    if top_k is not None:
        if not 1 <= top_k <= acc.size:
            raise DesteinError(f"top_k must be between 1 and {acc.size}, got {top_k}")
        order = np.argsort(-np.nan_to_num(acc.ravel(), nan=-1.0), kind="stable")[:top_k]
        marked = [divmod(int(i), acc.shape[1]) for i in order]
        label = f"top-{top_k} heads by accuracy"
    return head_grid(
        acc,
        title=title,
        colorbar_title="held-out probe accuracy",
        hover={"direction norm": direction_norm} if direction_norm is not None else None,
        marked=marked,
        marked_label=label,
        zrange=(0.5, 1.0),
        colorscale="Viridis",
    )


def _fit_pca(toxic: np.ndarray, nontoxic: np.ndarray, dims: int) -> Any:
    """PCA fitted on the two classes only, so steered points are shown in *their* geometry."""
    from sklearn.decomposition import PCA

    both = np.vstack([toxic, nontoxic])
    _check_size(both, dims, "PCA")
    return PCA(n_components=dims).fit(both)


def _check_size(points: np.ndarray, dims: int, method: str) -> None:
    """Both PCA and t-SNE (PCA-initialised) need at least ``dims`` points and features."""
    n, d = points.shape
    if n < dims or d < dims:
        raise DesteinError(
            f"{method} to {dims} dimensions needs at least {dims} points and {dims} features, "
            f"got {n} points of dimension {d}"
        )


def _class_points(toxic: Any, nontoxic: Any, steered: Any | None) -> list[np.ndarray]:
    """Validate [n, d] activations with one shared d; steered last if given."""
    sets = [_array(toxic, "toxic", 2), _array(nontoxic, "nontoxic", 2)]
    if steered is not None:
        sets.append(_array(steered, "steered", 2))
    widths = {s.shape[1] for s in sets}
    if len(widths) != 1:
        raise DesteinError(f"activations disagree on dimension: {sorted(widths)}")
    return sets


def _direction(direction: Any, d: int) -> np.ndarray:
    vec = _array(direction, "direction", 1)
    if vec.shape[0] != d:
        raise DesteinError(f"direction has dimension {vec.shape[0]}, activations have {d}")
    return vec


def _arrow(start: np.ndarray, delta: np.ndarray, *, showlegend: bool = True) -> go.Scatter:
    """Detox direction drawn from the non-toxic centroid, arrowhead at the tip."""
    end = start + delta
    return go.Scatter(
        x=[start[0], end[0]],
        y=[start[1], end[1]],
        mode="lines+markers",
        line={"color": COLORS["direction"], "width": 3},
        marker={
            "symbol": ["circle", "arrow"],
            "size": [7, 16],
            "angleref": "previous",
            "color": COLORS["direction"],
        },
        text=["non-toxic centroid", "centroid + detox direction"],
        hovertemplate="%{text}<extra></extra>",
        name="detox direction",
        legendgroup="direction",
        showlegend=showlegend,
    )


def _class_scatter(points: np.ndarray, role: str, label: str, **kwargs: Any) -> go.Scatter:
    return go.Scatter(
        x=points[:, 0],
        y=points[:, 1],
        mode="markers",
        marker={"color": COLORS[role], "size": 7, "opacity": 0.7},
        name=label,
        legendgroup=role,
        hovertemplate=label + "<extra></extra>",
        **kwargs,
    )


_LABELS = {"toxic": "toxic", "nontoxic": "non-toxic", "steered": "steered (after)"}


def activation_geometry(
    toxic: Any,
    nontoxic: Any,
    *,
    direction: Any | None = None,
    steered: Any | None = None,
    method: Literal["pca", "tsne"] = "pca",
    dims: Literal[2, 3] = 2,
    title: str = "Toxic vs non-toxic activations of one head",
    random_state: int = 0,
) -> go.Figure:
    """Project one head's toxic and non-toxic activations to 2-D or 3-D.

    PCA is fitted on toxic + non-toxic; ``steered`` points are projected into that same
    space, so "before and after" steering share axes. The detox direction is drawn from
    the non-toxic centroid: with direction = mean(toxic - nontoxic) it ends on the toxic
    centroid. t-SNE is non-linear, so it embeds all points jointly and cannot show the
    direction; the subtitle says so when one was given.
    """
    if method not in ("pca", "tsne"):
        raise DesteinError(f"method must be 'pca' or 'tsne', got {method!r}")
    if dims not in (2, 3):
        raise DesteinError(f"dims must be 2 or 3, got {dims!r}")
    sets = _class_points(toxic, nontoxic, steered)
    d = sets[0].shape[1]
    vec = _direction(direction, d) if direction is not None else None
    subtitle = None
    if method == "pca":
        pca = _fit_pca(sets[0], sets[1], dims)
        projected = [pca.transform(s) for s in sets]
        # 3-D axis titles are drawn along the axes, where long ones collide.
        of_variance = " of variance" if dims == 2 else ""
        axis_titles = [
            f"PC{i + 1} ({r:.0%}{of_variance})" for i, r in enumerate(pca.explained_variance_ratio_)
        ]
        # A direction is a displacement: rotate it with the components, never re-centre it.
        arrow = (projected[1].mean(axis=0), pca.components_ @ vec) if vec is not None else None
    else:
        from sklearn.manifold import TSNE

        stacked = np.vstack(sets)
        _check_size(stacked, dims, "t-SNE")
        n = stacked.shape[0]
        # sklearn needs perplexity < n_samples; 30 is its default for larger sets.
        embedded = TSNE(
            n_components=dims, perplexity=min(30.0, n - 1.0), init="pca", random_state=random_state
        ).fit_transform(stacked)
        projected = np.split(embedded, np.cumsum([len(s) for s in sets])[:-1])
        axis_titles = [f"t-SNE {i + 1}" for i in range(dims)]
        arrow = None
        if vec is not None:
            subtitle = "detox direction not drawn: t-SNE is non-linear, a direction has no image"
    roles = ["toxic", "nontoxic", "steered"][: len(projected)]
    fig = go.Figure()
    if dims == 2:
        for pts, role in zip(projected, roles):
            fig.add_trace(_class_scatter(pts, role, _LABELS[role]))
        if arrow is not None:
            fig.add_trace(_arrow(*arrow))
        fig.update_xaxes(title_text=axis_titles[0])
        fig.update_yaxes(title_text=axis_titles[1])
    else:
        for pts, role in zip(projected, roles):
            fig.add_trace(
                go.Scatter3d(
                    x=pts[:, 0],
                    y=pts[:, 1],
                    z=pts[:, 2],
                    mode="markers",
                    marker={"color": COLORS[role], "size": 3, "opacity": 0.7},
                    name=_LABELS[role],
                    hovertemplate=_LABELS[role] + "<extra></extra>",
                )
            )
        if arrow is not None:
            start, delta = arrow
            line = np.stack([start, start + delta])
            fig.add_trace(
                go.Scatter3d(
                    x=line[:, 0],
                    y=line[:, 1],
                    z=line[:, 2],
                    mode="lines+markers",
                    line={"color": COLORS["direction"], "width": 6},
                    marker={
                        "symbol": ["circle", "diamond"],
                        "size": [3, 7],
                        "color": COLORS["direction"],
                    },
                    text=["non-toxic centroid", "centroid + detox direction"],
                    hovertemplate="%{text}<extra></extra>",
                    name="detox direction",
                )
            )
        fig.update_layout(
            scene={
                "xaxis": {"title": {"text": axis_titles[0]}},
                "yaxis": {"title": {"text": axis_titles[1]}},
                "zaxis": {"title": {"text": axis_titles[2]}},
                # Plotly's default camera is close enough to clip the cube's corners.
                "camera": {"eye": {"x": 1.7, "y": 1.7, "z": 1.1}},
            }
        )
    fig.update_layout(height=560)
    method_name = "PCA" if method == "pca" else "t-SNE"
    return _finish(fig, f"{title} ({method_name}, {dims}-D)", subtitle)


def top_heads_geometry(
    per_head: Sequence[tuple[str, Any, Any, Any | None]],
    *,
    cols: int = 3,
    title: str = "Toxic vs non-toxic activations of the top heads (PCA)",
) -> go.Figure:
    """Small-multiple 2-D PCA views, one per (label, toxic, nontoxic, direction) head.

    Each panel has its own PCA: heads live in unrelated spaces, so shared axes would mislead.
    """
    if not per_head:
        raise DesteinError("per_head is empty: give at least one (label, toxic, nontoxic, direction)")
    if cols < 1:
        raise DesteinError(f"cols must be at least 1, got {cols}")
    cols = min(cols, len(per_head))
    rows = math.ceil(len(per_head) / cols)
    # Cells past the last head get no axes at all, rather than empty untitled ones.
    specs = [[{} if r * cols + c < len(per_head) else None for c in range(cols)] for r in range(rows)]
    fig = make_subplots(
        rows=rows,
        cols=cols,
        specs=specs,
        subplot_titles=[str(entry[0]) for entry in per_head],
        horizontal_spacing=0.08,
        vertical_spacing=min(0.12, 0.9 / (rows - 1)) if rows > 1 else 0.12,
    )
    for i, (_, toxic, nontoxic, direction) in enumerate(per_head):
        row, col = divmod(i, cols)
        sets = _class_points(toxic, nontoxic, None)
        pca = _fit_pca(sets[0], sets[1], 2)
        projected = [pca.transform(s) for s in sets]
        first = i == 0
        for pts, role in zip(projected, ("toxic", "nontoxic")):
            fig.add_trace(
                _class_scatter(pts, role, _LABELS[role], showlegend=first), row=row + 1, col=col + 1
            )
        if direction is not None:
            vec = _direction(direction, sets[0].shape[1])
            fig.add_trace(
                _arrow(projected[1].mean(axis=0), pca.components_ @ vec, showlegend=first),
                row=row + 1,
                col=col + 1,
            )
        ratios = pca.explained_variance_ratio_
        fig.update_xaxes(title_text=f"PC1 ({ratios[0]:.0%})", row=row + 1, col=col + 1)
        fig.update_yaxes(title_text=f"PC2 ({ratios[1]:.0%})", row=row + 1, col=col + 1)
    fig.update_layout(height=120 + 330 * rows)
    return _finish(fig, title)


def _rows(rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...], what: str) -> None:
    if not rows:
        raise DesteinError(f"no {what} rows to plot")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DesteinError(f"{what} row {i} lacks {', '.join(missing)}")


def _numeric_column(rows: Sequence[Mapping[str, Any]], key: str, what: str) -> np.ndarray:
    """A column that must be finite numbers; None/NaN usually means a run did not finish."""
    try:
        col = np.array([float(r[key]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise DesteinError(f"{what} column {key!r} must be numeric: {exc}") from None
    if not np.isfinite(col).all():
        raise DesteinError(f"{what} column {key!r} has missing or non-finite values")
    return col


def _pareto_mask(cost_a: np.ndarray, cost_b: np.ndarray) -> np.ndarray:
    """True where no other point is at least as good on both costs and better on one."""
    a, b = cost_a[:, None], cost_b[:, None]
    dominated = (cost_a <= a) & (cost_b <= b) & ((cost_a < a) | (cost_b < b))
    return ~dominated.any(axis=1)


def alpha_sweep(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Detoxification vs fluency across steering strength α",
) -> go.Figure:
    """Toxicity vs perplexity across steering strength, one line per method.

    Left panel: Expected Maximum Toxicity, right: Toxicity Probability, both against
    perplexity. Points are labelled with alpha; the dashed line joins the Pareto front over
    all methods (no other point has both lower toxicity and lower perplexity).
    """
    _rows(rows, SWEEP_KEYS, "sweep")
    values = {key: _numeric_column(rows, key, "sweep") for key in SWEEP_KEYS[1:]}
    methods = np.array([str(r["method"]) for r in rows])
    ppl, alpha = values["perplexity"], values["alpha"]
    panels = (
        ("expected_max_toxicity", "expected maximum toxicity"),
        ("toxicity_probability", "toxicity probability"),
    )
    fig = make_subplots(rows=1, cols=2, subplot_titles=[label for _, label in panels], horizontal_spacing=0.1)
    palette = qualitative.Plotly
    for col, (key, label) in enumerate(panels, start=1):
        tox = values[key]
        front = np.flatnonzero(_pareto_mask(ppl, tox))
        front = front[np.lexsort((tox[front], ppl[front]))]
        fig.add_trace(
            go.Scatter(
                x=ppl[front],
                y=tox[front],
                mode="lines+markers",
                line={"color": "black", "dash": "dash", "width": 1.5},
                marker={
                    "symbol": "circle-open",
                    "size": 17,
                    "color": "black",
                    "line": {"width": 2},
                },
                name="Pareto front",
                legendgroup="pareto",
                showlegend=col == 1,
                legendrank=1001,  # drawn first (under the methods), listed last
                hovertemplate="Pareto-optimal<extra></extra>",
            ),
            row=1,
            col=col,
        )
        for m, method in enumerate(dict.fromkeys(methods)):
            idx = np.flatnonzero(methods == method)
            idx = idx[np.argsort(alpha[idx], kind="stable")]
            fig.add_trace(
                go.Scatter(
                    x=ppl[idx],
                    y=tox[idx],
                    mode="lines+markers+text",
                    text=[f"α={a:g}" for a in alpha[idx]],
                    textposition="top center",
                    textfont={"size": 10},
                    marker={"size": 9, "color": palette[m % len(palette)]},
                    line={"color": palette[m % len(palette)]},
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    hovertemplate=f"{method}<br>%{{text}}<br>perplexity %{{x:.2f}}<br>"
                    f"{label} %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text=f"{label} (lower is better)", row=1, col=col)
    fig.update_xaxes(title_text="perplexity (lower is better)")
    fig.update_layout(height=520)
    return _finish(fig, title)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _cell_text(value: Any) -> str:
    """Escape generated text: plotly renders a subset of HTML, LM output has '<|...|>', and C0
    control characters (byte-level tokens) break plotly.js in static export: shown as \\xNN."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return html.escape(text).replace("\n", "<br>")


def generation_table(
    rows: Sequence[Mapping[str, Any]], *, title: str = "Generations: baseline vs steered"
) -> go.Figure:
    """Side-by-side continuations; toxicity cells at or above 0.5 (counted by TP) are shaded."""
    _rows(rows, GENERATION_KEYS, "generation")
    text_cols = [[_cell_text(r[k]) for r in rows] for k in GENERATION_KEYS[:3]]
    tox_cols = [_numeric_column(rows, k, "generation") for k in GENERATION_KEYS[3:]]
    fills = [["white"] * len(rows)] * 3 + [
        ["#f8d0d0" if t >= TOXIC_THRESHOLD else "white" for t in col] for col in tox_cols
    ]
    fig = go.Figure(
        go.Table(
            columnwidth=[2, 3, 3, 1, 1],
            header={
                "values": [
                    "<b>prompt</b>",
                    "<b>baseline</b>",
                    "<b>steered</b>",
                    "<b>baseline toxicity</b>",
                    "<b>steered toxicity</b>",
                ],
                "fill_color": "#e8e8e8",
                "align": "left",
            },
            cells={
                "values": text_cols + [[f"{t:.3f}" for t in col] for col in tox_cols],
                "fill_color": fills,
                "align": ["left"] * 3 + ["right"] * 2,
                "height": 26,
            },
        )
    )
    fig.update_layout(height=int(np.clip(160 + 70 * len(rows), 300, 1400)))
    return _finish(fig, title)


def _static_image(fig: go.Figure, fmt: str, scale: float) -> bytes:
    """Render with kaleido's headless Chromium; MathJax off so nothing is fetched from a CDN."""
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        raise DesteinError("static export needs kaleido: pip install 'kaleido>=1.0'") from None
    opts = {
        "format": fmt,
        "width": fig.layout.width or 1000,
        "height": fig.layout.height or 600,
        "scale": scale,
    }
    try:
        return kaleido.calc_fig_sync(fig, opts=opts, kopts={"mathjax": False})
    except ChromeNotFoundError:
        raise DesteinError(
            "static export needs Chromium: apt-get install chromium (or set BROWSER_PATH), "
            "or save with formats=('html',)"
        ) from None


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
    (png, svg, pdf) go through kaleido. Everything is rendered before anything is written,
    and each file is replaced atomically.
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
