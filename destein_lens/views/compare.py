"""The comparison's Pareto view: toxicity against the fluency it costs, one trace per method.

Reads a compare folder's metrics.json content (plain dicts): cells are the entries named
"<method>@<strength>", the reference is "baseline". Perplexity is shown relative to the
unsteered model's on the same prompts (1 = no fluency cost); error bars are the bootstrap 95%
intervals over prompts; chosen (calibrated) cells are stars; a budget is a dashed line.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..errors import DesteinError
from ._style import finish

PANELS = (("expected_max_toxicity", "EMT"), ("toxicity_probability", "TP"))


def pareto_points(metrics: Mapping[str, Any], scorer: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per method, its cells sorted by strength: name, strength, ppl ratio, EMT, TP and intervals
    (toxicity by the folder's scorer, or by another `scorer` that scored the same continuations)."""
    if "baseline" not in metrics:
        raise DesteinError("a Pareto view needs the baseline's metrics (perplexity is relative to it)")
    base_ppl = metrics["baseline"]["perplexity"]
    methods: dict[str, list[dict[str, Any]]] = {}
    for name, m in metrics.items():
        if not (isinstance(m, Mapping) and "expected_max_toxicity" in m):
            continue
        if scorer is not None and scorer != metrics.get("scorer"):
            if scorer not in m.get("by_scorer", {}):
                raise DesteinError(f"{name} was not scored by {scorer}")
            m = {**m, **m["by_scorer"][scorer]}
        method, _, strength = name.partition("@")
        point = {
            "cell": name,
            "strength": float(strength) if strength else 0.0,
            "ppl_ratio": m["perplexity"] / base_ppl,
        }
        for key, _ in PANELS:
            point[key] = m[key]
            point[f"{key}_ci"] = m.get(f"{key}_ci", [m[key], m[key]])
        methods.setdefault(method, []).append(point)
    return {method: sorted(points, key=lambda p: p["strength"]) for method, points in methods.items()}


def pareto_figure(
    metrics: Mapping[str, Any],
    *,
    chosen: Collection[str] = (),
    budget: float | None = None,
    title: str = "Detoxification against fluency cost",
    curves: Mapping[str, Any] | None = None,
    scorer: str | None = None,
) -> go.Figure:
    """EMT and TP against perplexity / unsteered perplexity, each method a line over its strengths.

    `curves` (a calibration's metrics) adds each method's whole curve over the strengths it
    tried, dotted and in the method's colour, under the evaluated points: where on its curve the
    chosen point sits. The curves are on the calibration prompts, the points on the evaluation
    prompts (each relative to the unsteered model on its own prompts). `scorer`: toxicity by
    another scorer of the same continuations (`rescoring`).
    """
    points = pareto_points(metrics, scorer)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[label for _, label in PANELS], horizontal_spacing=0.1)
    # a colour per method: D3 has ten, the baseline is grey
    palette = qualitative.D3 if len(points) <= len(qualitative.D3) + 1 else qualitative.Dark24
    colors = {
        method: "#555555" if method == "baseline" else palette[i % len(palette)]
        for i, method in enumerate(points)
    }
    for method, cells in (pareto_points(curves) if curves is not None else {}).items():
        if method == "baseline":  # at (1, its own EMT): no curve
            continue
        color = colors.get(method) or palette[len(colors) % len(palette)]
        colors.setdefault(method, color)
        for col, (key, _) in enumerate(PANELS, start=1):
            fig.add_trace(
                go.Scatter(
                    x=[p["ppl_ratio"] for p in cells],
                    y=[p[key] for p in cells],
                    mode="markers+lines",
                    marker={"color": color, "size": 5, "symbol": "circle-open"},
                    line={"color": color, "width": 1, "dash": "dot"},
                    name=f"{method} (calibration)",
                    legendgroup=method,  # shown and hidden with the method's own entry
                    showlegend=False,
                    text=[p["cell"] for p in cells],
                    hovertemplate="%{text} (calibration prompts)<br>PPL x%{x:.2f}<br>%{y:.3f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    for method, cells in points.items():
        color = colors[method]
        for col, (key, label) in enumerate(PANELS, start=1):
            values = [p[key] for p in cells]
            fig.add_trace(
                go.Scatter(
                    x=[p["ppl_ratio"] for p in cells],
                    y=values,
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": [p[f"{key}_ci"][1] - v for p, v in zip(cells, values)],
                        "arrayminus": [v - p[f"{key}_ci"][0] for p, v in zip(cells, values)],
                        "thickness": 1,
                    },
                    mode="markers+lines" if len(cells) > 1 else "markers",
                    marker={
                        "color": color,
                        "size": [16 if p["cell"] in chosen else 9 for p in cells],
                        "symbol": ["star" if p["cell"] in chosen else "circle" for p in cells],
                    },
                    line={"color": color, "width": 1},
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    text=[p["cell"] for p in cells],
                    hovertemplate="%{text}<br>PPL x%{x:.2f}<br>" + label + " %{y:.3f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        if budget is not None:
            for col in (1, 2):
                fig.add_vline(x=budget, line_dash="dash", line_color="#888888", row=1, col=col)
    for col, (_, label) in enumerate(PANELS, start=1):
        fig.update_xaxes(title_text="perplexity / unsteered perplexity", row=1, col=col)
        fig.update_yaxes(title_text=label, rangemode="tozero", row=1, col=col)
    subtitle = (
        "bars: bootstrap 95% intervals over prompts"
        + ("; stars: calibrated strengths" if chosen else "")
        + ("; dotted: each method's calibration curve" if curves is not None else "")
    )
    fig.update_layout(legend={"tracegroupgap": 2})  # every method's entry fits beside the panels
    return finish(fig, title, subtitle)
