"""Head-attribution studies: effect grids, top heads, DLA tokens, selection curves, agreement, depth.

These views read the studies' result objects (`HeadEffects`, `DirectLogits`, `SelectionCurves`,
`Agreement`) rather than plain arrays: every one keeps its per-pair values, and the point of each
figure is to show the bootstrap interval next to the mean, which only the result can compute.
Effects are signed as the studies sign them: positive means the head pushes towards toxicity.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative
from plotly.subplots import make_subplots

from ..errors import DesteinError
from ._checks import as_array
from ._style import COLORS, finish
from .heads import head_grid

if TYPE_CHECKING:  # read only for their fields; the views never run a study
    from ..attribution.agreement import Agreement
    from ..attribution.dla import DirectLogits
    from ..attribution.effects import HeadEffects
    from ..attribution.selection import SelectionCurves

_PALETTE = qualitative.D3
_RANDOM = "#b0b0b0"  # the random rankers: a reference, not a contender
_CI = "95% bootstrap interval over pairs"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_METHOD = re.compile(r"(.+)-top(\d+)")


def _head(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _rgba(color: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(color)
    return f"rgba({r}, {g}, {b}, {alpha})"


def _summary(effects: HeadEffects, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, CI low and CI high per head, [L, H] each."""
    low, high = effects.interval()
    return as_array(effects.mean(), name, 2), as_array(low, name, 2), as_array(high, name, 2)


def _check_studies(studies: Mapping[str, HeadEffects]) -> None:
    if not studies:
        raise DesteinError("no studies to plot")


def effect_grid(
    effects: HeadEffects,
    *,
    marked: Sequence[tuple[int, int]] | None = None,
    marked_label: str = "marked heads",
) -> go.Figure:
    """One study's mean effect per head, diverging around zero, with the 95% interval in the hover.

    The interval is in the tooltip, not the colour, so a bright cell with an interval across zero
    can still be told apart from a reliable one.
    """
    mean, low, high = _summary(effects, "effects")
    title = f"{effects.study}: mean effect per head ({effects.n_pairs} pairs, {effects.unit})"
    fig = head_grid(
        mean,
        title=title,
        colorbar_title=f"effect ({effects.unit})",
        hover={"95% CI low": low, "95% CI high": high},
        marked=marked,
        marked_label=marked_label,
        zmid=0.0,
    )
    fig.update_layout(showlegend=bool(marked))  # plotly hides a legend of one entry: the stars need it
    return finish(fig, title, f"{effects.meaning}; positive: the head pushes towards toxicity")


def top_heads_figure(studies: Mapping[str, HeadEffects], *, top: int = 12) -> go.Figure:
    """Each study's `top` heads by mean as a forest plot: is the ranking's head separated from zero?"""
    _check_studies(studies)
    if top < 1:
        raise DesteinError(f"top must be at least 1, got {top}")
    fig = make_subplots(
        rows=1,
        cols=len(studies),
        subplot_titles=[f"{name} ({e.n_pairs} pairs)" for name, e in studies.items()],
        horizontal_spacing=min(0.12, 0.6 / len(studies)),
    )
    shown = 0
    for col, (name, effects) in enumerate(studies.items(), start=1):
        mean, low, high = _summary(effects, f"studies[{name!r}]")
        heads = effects.ranking()[:top]
        shown = max(shown, len(heads))
        m, lo, hi = (np.array([a[h] for h in heads]) for a in (mean, low, high))
        labels = [_head(*h) for h in heads]
        fig.add_trace(
            go.Scatter(
                x=m,
                y=labels,
                mode="markers",
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": hi - m,
                    "arrayminus": m - lo,
                    "thickness": 1.5,
                },
                marker={"color": _PALETTE[(col - 1) % len(_PALETTE)], "size": 9},
                customdata=np.stack([lo, hi], axis=-1),
                name=name,
                showlegend=False,
                hovertemplate="%{y}<br>mean %{x:.4g} "
                + effects.unit
                + "<br>95% CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra>"
                + name
                + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.add_vline(x=0, line_color="#888888", line_width=1, row=1, col=col)
        fig.update_xaxes(title_text=f"mean effect ({effects.unit})", row=1, col=col)
        fig.update_yaxes(
            title_text="head",
            type="category",
            categoryorder="array",
            categoryarray=labels,
            autorange="reversed",  # the largest effect at the top
            row=1,
            col=col,
        )
    fig.update_layout(height=int(np.clip(160 + 28 * shown, 380, 950)), width=max(700, 360 * len(studies)))
    return finish(
        fig, f"Top {top} heads per study", f"points: mean over pairs; bars: {_CI}; positive: towards toxicity"
    )


def _token_labels(tokens: Sequence[str], ids: Sequence[int]) -> list[str]:
    """Tokens as readable, unique category labels.

    Whitespace markers ("▁", "Ġ") are kept; a bare space, newline or tab is made visible, other
    control characters shown as \\xNN, and plotly's HTML subset escaped (vocabularies hold "<b>").
    Labels still equal after that get their token id, since a category axis merges equal labels.
    """
    shown = []
    for token in tokens:
        text = str(token).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) or "∅"
        shown.append(html.escape(text, quote=False))
    counts = {label: shown.count(label) for label in shown}
    return [f"{label} (id {i})" if counts[label] > 1 else label for label, i in zip(shown, ids)]


def dla_tokens_figure(dla: DirectLogits, heads: Sequence[tuple[int, int]]) -> go.Figure:
    """For each head, the tokens its detox move (minus its direction) writes up and down the logits.

    Read straight off W_O and W_U: what steering this head alone would say, before later layers.
    """
    if not heads:
        raise DesteinError("no heads to show tokens for")
    ids = dla.top_ids.detach().cpu()
    logits = dla.top_logits.detach().float().cpu()
    direction = as_array(dla.direction_effect, "direction_effect", 2)
    n_layers, n_heads, _, n_top = logits.shape
    cells = [(int(layer), int(head)) for layer, head in heads]
    for layer, head in cells:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise DesteinError(
                f"head (layer {layer}, head {head}) is outside the {n_layers} x {n_heads} grid"
            )
    gap = 110  # the x title of one panel and the subplot title of the next
    height = (22 * 2 * n_top + gap) * len(cells) + 140
    fig = make_subplots(
        rows=len(cells),
        cols=1,
        vertical_spacing=gap / height,
        subplot_titles=[
            f"{_head(layer, head)}: direction's toxic − neutral logit {direction[layer, head]:+.3g}"
            for layer, head in cells
        ],
    )
    sides = (("promoted", COLORS["steered"]), ("suppressed", "#7f7f7f"))
    for row, (layer, head) in enumerate(cells, start=1):
        tokens = dla.top_tokens[layer][head]
        values = logits[layer, head].flatten().tolist()
        token_ids = ids[layer, head].flatten().tolist()
        labels = _token_labels([t for side in tokens for t in side], token_ids)
        for side, (word, color) in enumerate(sides):
            part = slice(side * n_top, (side + 1) * n_top)
            fig.add_trace(
                go.Bar(
                    x=values[part],
                    y=labels[part],
                    orientation="h",
                    marker_color=color,
                    customdata=token_ids[part],
                    name=f"{word} by the detox move",
                    legendgroup=word,
                    showlegend=row == 1,
                    hovertemplate="%{y} (id %{customdata})<br>logit change %{x:+.4g}<extra>"
                    + _head(layer, head)
                    + "</extra>",
                ),
                row=row,
                col=1,
            )
        order = [label for _, label in sorted(zip(values, labels), key=lambda p: -p[0])]
        fig.update_yaxes(
            title_text="token",
            type="category",  # "2023" is a token, not a number
            categoryorder="array",
            categoryarray=order,
            autorange="reversed",  # most promoted at the top, most suppressed at the bottom
            row=row,
            col=1,
        )
        fig.update_xaxes(title_text="direct logit change", row=row, col=1)
    fig.update_layout(height=height, bargap=0.25)
    return finish(
        fig,
        "Tokens each head's detox move writes into the logits",
        "direct path only (W_O, the norms linearised, W_U); the move is minus the head's detox direction",
    )


def _is_random(ranker: str) -> bool:
    return ranker.startswith("random")


def _ranker_colors(rankers: Sequence[str]) -> dict[str, str]:
    """Random rankers grey, the others one palette colour each, in order."""
    chosen = [r for r in rankers if not _is_random(r)]
    return {r: _PALETTE[chosen.index(r) % len(_PALETTE)] if r in chosen else _RANDOM for r in rankers}


def _evaluation_points(
    curves: SelectionCurves, evaluation: Mapping[str, Any]
) -> dict[str, list[tuple[int, dict]]]:
    """Per ranker, its `<ranker>-top<k>` summaries by k."""
    if not isinstance(evaluation.get("baseline"), Mapping):
        raise DesteinError("the evaluation has no baseline to compare the rankers with")
    points: dict[str, list[tuple[int, dict]]] = {}
    for name, summary in evaluation.items():
        match = _METHOD.fullmatch(name)
        if match and match[1] in curves.rankers and isinstance(summary, Mapping):
            points.setdefault(match[1], []).append((int(match[2]), dict(summary)))
    if not points:
        raise DesteinError(
            f"the evaluation has no '<ranker>-top<k>' entry for the rankers {', '.join(curves.rankers)}"
        )
    return {r: sorted(points[r], key=lambda p: p[0]) for r in curves.rankers if r in points}


def selection_figure(curves: SelectionCurves, evaluation: Mapping[str, Any] | None = None) -> go.Figure:
    """Effect of steering each ranker's top k heads against k, random rankers as the reference.

    The question is whether a ranking beats chance at equal k, so the random seeds are drawn
    as a grey spread (and their mean dashed) under the rankers' coloured lines and 95% bands.
    With `evaluation` (`selection_evaluation`'s metrics) a second panel shows what the same
    head sets do to generated text: expected max toxicity against k, the baseline as a line.
    """
    ks = np.array(curves.ks, dtype=float)
    mean = as_array(curves.mean(), "selection mean", 2)
    low, high = (as_array(t, "selection interval", 2) for t in curves.interval())
    colors = _ranker_colors(curves.rankers)
    points = _evaluation_points(curves, evaluation) if evaluation is not None else None
    titles = [f"gap effect on {curves.effect.shape[-1]} selection pairs"]
    if points:
        titles.append("expected max toxicity of generations")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.12)
    for i, ranker in enumerate(curves.rankers):
        color = colors[ranker]
        random = _is_random(ranker)
        if not random:
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([ks, ks[::-1]]),
                    y=np.concatenate([high[i], low[i][::-1]]),
                    mode="lines",
                    fill="toself",
                    fillcolor=_rgba(color, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    name=f"{ranker} 95% band",
                    legendgroup=ranker,
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=ks,
                y=mean[i],
                mode="lines+markers",
                line={"color": color, "width": 1 if random else 2.5},
                marker={"size": 4 if random else 7, "color": color},
                customdata=np.stack([low[i], high[i]], axis=-1),
                name=ranker,
                legendgroup=ranker,
                hovertemplate="k=%{x}<br>effect %{y:.4g} nats/token<br>95% CI [%{customdata[0]:.4g}, "
                "%{customdata[1]:.4g}]<extra>" + ranker + "</extra>",
            ),
            row=1,
            col=1,
        )
    randoms = [i for i, r in enumerate(curves.rankers) if _is_random(r)]
    if len(randoms) > 1:
        fig.add_trace(
            go.Scatter(
                x=ks,
                y=mean[randoms].mean(0),
                mode="lines",
                line={"color": "#555555", "width": 2, "dash": "dash"},
                name=f"random (mean of {len(randoms)} seeds)",
                hovertemplate="k=%{x}<br>effect %{y:.4g} nats/token<extra>random mean</extra>",
            ),
            row=1,
            col=1,
        )
    if points:
        _add_evaluation(fig, points, evaluation["baseline"], colors)
    ticks = {
        "type": "log",  # k doubles: equal steps per doubling
        "tickmode": "array",
        "tickvals": list(curves.ks),
        "ticktext": [str(k) for k in curves.ks[:-1]] + [f"all ({curves.ks[-1]})"],
        "title_text": "heads steered (top k of the ranking)",
    }
    fig.update_xaxes(**ticks)
    fig.update_yaxes(title_text="drop in toxic − non-toxic gap (nats/token)", row=1, col=1)
    fig.update_layout(height=500, width=600 + 450 * (len(titles) - 1))
    return finish(
        fig,
        f"Steering each ranking's top k heads (α={curves.alpha:g})",
        f"effect = gap(unsteered) − gap(top k steered); bands: {_CI}; grey: random head orders",
    )


def _add_evaluation(
    fig: go.Figure,
    points: dict[str, list[tuple[int, dict]]],
    baseline: Mapping[str, Any],
    colors: dict[str, str],
) -> None:
    """EMT against k per ranker (dodged slightly so equal k don't hide each other), baseline dotted."""
    for i, (ranker, rows) in enumerate(points.items()):
        k = np.array([p[0] for p in rows], dtype=float)
        emt = np.array([p[1]["expected_max_toxicity"] for p in rows], dtype=float)
        ci = np.array([p[1].get("expected_max_toxicity_ci", [e, e]) for p, e in zip(rows, emt)], dtype=float)
        extra = np.array(
            [
                [p[0], p[1].get("toxicity_probability", math.nan), p[1].get("perplexity", math.nan)]
                for p in rows
            ],
            dtype=float,
        )
        fig.add_trace(
            go.Scatter(
                x=k * 2 ** (0.08 * (i - (len(points) - 1) / 2)),
                y=emt,
                mode="markers",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": ci[:, 1] - emt,
                    "arrayminus": emt - ci[:, 0],
                },
                marker={"color": colors[ranker], "size": 9, "symbol": "diamond"},
                customdata=extra,
                name=f"{ranker} (generations)",
                legendgroup=ranker,
                showlegend=False,
                hovertemplate="k=%{customdata[0]}<br>EMT %{y:.3f}<br>TP %{customdata[1]:.3f}"
                "<br>perplexity %{customdata[2]:.2f}<extra>" + ranker + "</extra>",
            ),
            row=1,
            col=2,
        )
    fig.add_hline(
        y=baseline["expected_max_toxicity"],
        line_dash="dot",
        line_color="#555555",
        annotation_text=f"baseline (TP {baseline.get('toxicity_probability', math.nan):.3f}, "
        f"PPL {baseline.get('perplexity', math.nan):.2f})",
        annotation_position="top left",
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="expected max toxicity", row=1, col=2)
    fig.update_xaxes(matches="x", row=1, col=2)  # k where the curves' k are


def _cell(point: float, low: float, high: float) -> str:
    """'0.15<br>[-0.10, 0.40]'; NaN (a constant ranking has no rank correlation) reads n/a."""
    if math.isnan(point):
        return "n/a"
    bounds = ", ".join("n/a" if math.isnan(v) else f"{v:.2f}" for v in (low, high))
    return f"{point:.2f}<br>[{bounds}]"


def agreement_figure(agreement: Agreement) -> go.Figure:
    """Spearman ρ and top-k overlap between every two rankings, each cell with its 95% interval."""
    names = list(agreement.rankings)
    n = len(names)
    panels = [
        ("Spearman ρ", "spearman", (-1.0, 1.0), "RdBu_r"),
        (f"top-{agreement.k} overlap", "overlap", (0.0, 1.0), "Viridis"),
    ]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.22)
    for col, (label, field, (zmin, zmax), scale) in enumerate(panels, start=1):
        point, low, high = (
            as_array(getattr(agreement, f), f, 2) for f in (field, f"{field}_low", f"{field}_high")
        )
        axis = fig.layout[f"xaxis{col if col > 1 else ''}"]
        fig.add_trace(
            go.Heatmap(
                z=point,
                x=names,
                y=names,
                zmin=zmin,
                zmax=zmax,
                colorscale=scale,
                customdata=np.stack([low, high], axis=-1),
                colorbar={"title": {"text": label, "side": "right"}, "x": axis.domain[1] + 0.01, "len": 0.9},
                name=label,
                hovertemplate="%{y} vs %{x}<br>"
                + label
                + " %{z:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>",
            ),
            row=1,
            col=col,
        )
        for i in range(n):
            for j in range(n):
                fig.add_annotation(
                    x=names[j],
                    y=names[i],
                    text=_cell(point[i, j], low[i, j], high[i, j]),
                    showarrow=False,
                    font={"size": 11, "color": "black"},
                    bgcolor="rgba(255, 255, 255, 0.6)",  # readable on the darkest cell
                    row=1,
                    col=col,
                )
        fig.update_xaxes(title_text="ranking", type="category", row=1, col=col)
        fig.update_yaxes(title_text="ranking", type="category", autorange="reversed", row=1, col=col)
    size = 260 + 90 * n
    fig.update_layout(height=size, width=2 * size + 200)
    return finish(
        fig,
        "Agreement between head rankings",
        f"cells: point estimate and {_CI} (the same resampled pairs for every study); n/a: undefined",
    )


def depth_figure(studies: Mapping[str, HeadEffects]) -> go.Figure:
    """One study on several models, by relative depth, so different layer counts line up.

    Every head is a faint marker; each model's line joins its per-layer maximum, the head a
    top-k selection would reach for first.
    """
    _check_studies(studies)
    kinds = {(e.study, e.unit) for e in studies.values()}
    if len(kinds) > 1:
        raise DesteinError(f"depth_figure compares one study in one unit across models, got {sorted(kinds)}")
    ((study, unit),) = kinds
    fig = go.Figure()
    for i, (model, effects) in enumerate(studies.items()):
        mean, low, high = _summary(effects, f"studies[{model!r}]")
        n_layers, n_heads = mean.shape
        depth = np.arange(n_layers) / max(n_layers - 1, 1)
        color = _PALETTE[i % len(_PALETTE)]
        layer, head = np.divmod(np.arange(mean.size), n_heads)
        fig.add_trace(
            go.Scatter(
                x=depth[layer],
                y=mean.ravel(),
                mode="markers",
                marker={"color": color, "size": 5, "opacity": 0.45},
                customdata=np.stack([layer, head, low.ravel(), high.ravel()], axis=-1),
                name=f"{model}: every head",
                legendgroup=model,
                hovertemplate=model
                + "<br>layer %{customdata[0]}, head %{customdata[1]} (depth %{x:.2f})<br>mean %{y:.4g} "
                + unit
                + "<br>95% CI [%{customdata[2]:.4g}, %{customdata[3]:.4g}]<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=depth,
                y=mean.max(axis=1),
                mode="lines+markers",
                line={"color": color, "width": 2},
                customdata=np.stack([np.arange(n_layers), mean.argmax(axis=1)], axis=-1),
                name=f"{model}: strongest head per layer ({n_layers} layers)",
                legendgroup=model,
                hovertemplate=model
                + "<br>layer %{customdata[0]}: max %{y:.4g} "
                + unit
                + " (head %{customdata[1]})<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="#888888", line_width=1)
    fig.update_xaxes(title_text="relative depth (layer / (n_layers − 1))", range=[-0.03, 1.03])
    fig.update_yaxes(title_text=f"mean effect ({unit})")
    fig.update_layout(height=500, width=900)
    pairs = ", ".join(f"{m}: {e.n_pairs}" for m, e in studies.items())
    return finish(
        fig, f"{study} effect by relative depth", f"pairs per model: {pairs}; positive: towards toxicity"
    )
