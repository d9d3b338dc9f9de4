"""Activation geometry: one head's toxic and non-toxic activations projected to 2-D or 3-D.

PCA is fitted on the two classes only, so steered points and the detox direction are shown in
the classes' own geometry; t-SNE is offered for shape but cannot draw a direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DesteinError
from ._checks import as_array
from ._style import COLORS, finish

_LABELS = {"toxic": "toxic", "nontoxic": "non-toxic", "steered": "steered (after)"}


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
    sets = [as_array(toxic, "toxic", 2), as_array(nontoxic, "nontoxic", 2)]
    if steered is not None:
        sets.append(as_array(steered, "steered", 2))
    widths = {s.shape[1] for s in sets}
    if len(widths) != 1:
        raise DesteinError(f"activations disagree on dimension: {sorted(widths)}")
    return sets


def _direction(direction: Any, d: int) -> np.ndarray:
    """A 1-D direction of the activations' width."""
    vec = as_array(direction, "direction", 1)
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
    """One class's 2-D points in its role's colour."""
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


def _scatter3d(points: np.ndarray, **kwargs: Any) -> go.Scatter3d:
    """A 3-D trace through the rows of an [n, 3] array."""
    return go.Scatter3d(x=points[:, 0], y=points[:, 1], z=points[:, 2], **kwargs)


def _add_3d(
    fig: go.Figure,
    projected: Sequence[np.ndarray],
    roles: Sequence[str],
    arrow: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """The 3-D version of the class clouds and the direction (no arrowheads in 3-D: a diamond tip)."""
    for pts, role in zip(projected, roles):
        fig.add_trace(
            _scatter3d(
                pts,
                mode="markers",
                marker={"color": COLORS[role], "size": 3, "opacity": 0.7},
                name=_LABELS[role],
                hovertemplate=_LABELS[role] + "<extra></extra>",
            )
        )
    if arrow is not None:
        start, delta = arrow
        fig.add_trace(
            _scatter3d(
                np.stack([start, start + delta]),
                mode="lines+markers",
                line={"color": COLORS["direction"], "width": 6},
                marker={"symbol": ["circle", "diamond"], "size": [3, 7], "color": COLORS["direction"]},
                text=["non-toxic centroid", "centroid + detox direction"],
                hovertemplate="%{text}<extra></extra>",
                name="detox direction",
            )
        )


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
        _add_3d(fig, projected, roles, arrow)
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
    return finish(fig, f"{title} ({method_name}, {dims}-D)", subtitle)


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
    return finish(fig, title)
