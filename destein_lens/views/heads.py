"""Layer x head grids: any per-head value and probe accuracy (the attribution studies' grids reuse
`head_grid`, see `views.attribution`).

Stars on a grid always mark heads the caller names, never a top-k computed here: the project has
one head ranking, `DetoxVectors.ranking()`, and a figure should star exactly the heads
`steer(heads=k)` steers, i.e. `vectors.ranking()[:k]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..errors import DesteinError
from ._checks import as_array
from ._style import finish, int_axis


def _steered_heads_label(k: int) -> str:
    """Legend entry for the stars on `vectors.ranking()[:k]`."""
    return f"the top-{k} heads steer(heads={k}) picks"


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
    z = as_array(values, "values", 2)
    n_layers, n_heads = z.shape
    names = list(hover or {})
    extra = [as_array(hover[k], f"hover[{k!r}]", 2) for k in names] if hover else []
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
    fig.update_xaxes(title_text="head", **int_axis(n_heads))
    y_axis = int_axis(n_layers)
    y_axis["range"] = y_axis["range"][::-1]  # layer 0 at the top
    fig.update_yaxes(title_text="layer", **y_axis)
    fig.update_layout(
        height=int(np.clip(140 + 26 * n_layers, 380, 950)),
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 1.0, "xanchor": "right"},
    )
    return finish(fig, title)


def probe_heatmap(
    accuracy: Any,
    *,
    direction_norm: Any | None = None,
    marked: Sequence[tuple[int, int]] | None = None,
    marked_label: str | None = None,
    title: str = "Per-head probe accuracy: toxic vs non-toxic",
) -> go.Figure:
    """Held-out probe accuracy per head, the quantity DeStein uses to pick and weight heads.

    The scale starts at 0.5 (chance for balanced classes) so near-chance heads all look
    alike. Pass ``marked=vectors.ranking()[:k]`` to star the heads ``steer(heads=k)`` steers
    (the default ``marked_label`` says so); an argsort of this grid would break accuracy ties
    differently and star other heads.
    """
    acc = as_array(accuracy, "accuracy", 2)
    if np.nanmin(acc) < 0 or np.nanmax(acc) > 1:
        raise DesteinError("accuracy must be fractions in [0, 1] (not percentages)")
    return head_grid(
        acc,
        title=title,
        colorbar_title="held-out probe accuracy",
        hover={"direction norm": direction_norm} if direction_norm is not None else None,
        marked=marked,
        marked_label=marked_label or _steered_heads_label(len(marked or ())),
        zrange=(0.5, 1.0),
        colorscale="Viridis",
    )
