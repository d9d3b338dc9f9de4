"""Generations side by side, baseline vs steered, with their toxicity scores.

Numbers alone hide how steering fails (repetition, off-topic text); a table of continuations from
the same seed shows it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ._checks import check_rows, numeric_column
from ._style import finish

# Toxicity at or above this counts as toxic for Toxicity Probability (Gehman et al. 2020).
TOXIC_THRESHOLD = 0.5
GENERATION_KEYS = ("prompt", "baseline", "steered", "baseline_toxicity", "steered_toxicity")
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
    check_rows(rows, GENERATION_KEYS, "generation")
    text_cols = [[_cell_text(r[k]) for r in rows] for k in GENERATION_KEYS[:3]]
    tox_cols = [numeric_column(rows, k, "generation") for k in GENERATION_KEYS[3:]]
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
    return finish(fig, title)
