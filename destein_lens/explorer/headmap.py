"""The explorer's head map: a layer x head grid whose stars are the steered heads.

The grid is one of the project's figures (`views.probe_heatmap`, or `views.effect_grid` for an
attribution study's effects) turned into a Plotly `FigureWidget`, which reports clicks back to
Python. It is drawn once with every head starred, then the star trace is set to the selection, so
an empty selection keeps the trace and its legend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go

from ..attribution import HeadEffects
from ..vectors import DetoxVectors
from ..views import effect_grid, probe_heatmap

PROBE = "probe accuracy"
STARS = 1  # the star trace's index: after the heatmap
_LABEL = "steered heads"


def head_map(
    vectors: DetoxVectors, effects: HeadEffects | None, on_click: Callable[[int, int], None]
) -> go.FigureWidget:
    """The probe map (or `effects`'s grid); `on_click(layer, head)` is called for each clicked cell."""
    n_layers, n_heads = vectors.shape
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if effects is None:
        norms = vectors.directions.norm(dim=-1)
        figure = probe_heatmap(
            vectors.probe_accuracy, direction_norm=norms, marked=every, marked_label=_LABEL
        )
    else:
        figure = effect_grid(effects, marked=every, marked_label=_LABEL)
    figure.update_layout(
        width=470, height=min(figure.layout.height, 640), margin={"l": 60, "r": 20, "t": 90}, showlegend=True
    )
    # The stars take no hover: a star near the cursor would otherwise win plotly's closest-point
    # hover over the cell under it, and a click would toggle the neighbouring head.
    figure.update_traces(selector={"type": "scatter"}, hoverinfo="skip", hovertemplate=None)
    widget = go.FigureWidget(figure)

    def clicked(trace: object, points: object, state: object) -> None:
        for head, layer in zip(points.xs, points.ys):
            on_click(int(layer), int(head))

    widget.data[0].on_click(clicked)
    return widget


def show_selection(widget: go.FigureWidget, heads: Sequence[tuple[int, int]]) -> None:
    with widget.batch_update():
        widget.data[STARS].x = [head for _, head in heads]
        widget.data[STARS].y = [layer for layer, _ in heads]
