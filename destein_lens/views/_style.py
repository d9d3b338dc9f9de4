"""The look every figure shares: one template, one colour per role, titles, integer head/layer axes.

Figures end up in papers and slides, where an unlabelled axis is a question nobody can answer and
"toxic" in another colour than the last figure is a misreading, so this is set in one place.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

TEMPLATE = "plotly_white"
# One colour per role across every figure, so "toxic" looks the same in all of them.
COLORS = {
    "toxic": "#d62728",
    "nontoxic": "#1f77b4",
    "steered": "#9467bd",
    "direction": "#111111",
}


def finish(fig: go.Figure, title: str, subtitle: str | None = None) -> go.Figure:
    """Apply the shared template and title; the one place figure-wide style is set."""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title, "subtitle": {"text": subtitle} if subtitle else None, "x": 0.02},
        font={"size": 13},
    )
    return fig


def int_axis(n: int) -> dict[str, Any]:
    """Integer ticks readable for 12 or 48 layers/heads; range pinned so markers can't pad it."""
    return {
        "tickmode": "linear",
        "tick0": 0,
        "dtick": max(1, math.ceil(n / 24)),
        "range": [-0.5, n - 0.5],
        "showgrid": False,
        "zeroline": False,
    }
