"""Layer x head grids: any per-head value, probe accuracy, and single-head attribution.

Stars on a grid always mark heads the caller names, never a top-k computed here: the project has
one head ranking, `DetoxVectors.ranking()`, and a figure should star exactly the heads
`steer(heads=k)` steers, i.e. `vectors.ranking()[:k]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import DesteinError
from ._checks import as_array
from ._style import finish, int_axis

if TYPE_CHECKING:  # views take plain arrays; only the attribution figure reads package objects
    from ..attribution import HeadAttribution
    from ..vectors import DetoxVectors


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


def attribution_figure(result: HeadAttribution, vectors: DetoxVectors, *, top_k: int = 8) -> go.Figure:
    """Effect grid next to the probe-accuracy grid, the heads `steer(heads=top_k)` picks starred on both.

    Each panel is the package's own head grid; only their traces and axes are moved into one
    figure, so colours, hover text and layer-0-on-top stay what every other grid shows.
    """
    if result.effect.shape != vectors.probe_accuracy.shape:
        raise DesteinError(
            f"attribution grid {tuple(result.effect.shape)} does not match the vectors' "
            f"{tuple(vectors.probe_accuracy.shape)}"
        )
    if top_k < 1:
        raise DesteinError(f"top_k must be at least 1, got {top_k}")
    top_k = min(top_k, result.effect.numel())
    marked = vectors.ranking()[:top_k]
    panels = [
        head_grid(
            result.effect,
            title="",
            colorbar_title="effect (nats/token)",
            hover={"probe accuracy": vectors.probe_accuracy},
            zmid=0.0,
            marked=marked,
            marked_label=_steered_heads_label(top_k),
        ),
        probe_heatmap(vectors.probe_accuracy, direction_norm=vectors.directions.norm(dim=-1), marked=marked),
    ]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.2,
        subplot_titles=[
            f"effect of steering the head alone (α={result.alpha:g})",
            "held-out probe accuracy",
        ],
    )
    for col, panel in enumerate(panels, start=1):
        for trace in panel.data:
            fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(panel.layout.xaxis, row=1, col=col)
        fig.update_yaxes(panel.layout.yaxis, row=1, col=col)
    fig.data[-1].showlegend = False  # the same stars on both panels, listed once
    # One colour bar beside each panel instead of both at the right edge.
    heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
    for trace, axis in zip(heatmaps, (fig.layout.xaxis, fig.layout.xaxis2)):
        trace.colorbar.update(x=axis.domain[1] + 0.01, len=0.9)
    rho = "undefined" if result.spearman != result.spearman else f"{result.spearman:.2f}"
    fig.update_layout(
        template=panels[1].layout.template,
        font=panels[1].layout.font,
        legend=panels[0].layout.legend.update(y=1.07),  # above the panel titles, not on them
        height=panels[1].layout.height + 40,
        margin={"t": 150},
        width=1200,
        title={
            "text": f"Single-head steering effect vs probe accuracy (Spearman ρ = {rho})",
            "subtitle": {
                "text": f"effect = drop in the held-out toxic − non-toxic log-prob gap "
                f"({result.n_pairs} pairs, unsteered gap {result.baseline_gap:.3g} nats/token)"
            },
            "x": 0.02,
        },
    )
    return fig
