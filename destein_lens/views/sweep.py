"""Steering strength sweep: toxicity against perplexity, one line per method, with the Pareto front.

Detoxification is a trade-off (more steering, less toxicity, worse text), so a sweep is read as a
front rather than a best row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ._checks import check_rows, numeric_column
from ._style import finish

SWEEP_KEYS = ("method", "alpha", "expected_max_toxicity", "toxicity_probability", "perplexity")


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
    check_rows(rows, SWEEP_KEYS, "sweep")
    values = {key: numeric_column(rows, key, "sweep") for key in SWEEP_KEYS[1:]}
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
    return finish(fig, title)
