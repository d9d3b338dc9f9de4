"""The numbers DeStein's paper published, for reports to print beside ours, never mixed into them.

Other models (GPT2-large, 7B models) and another scorer (the Perspective API) than this workbench
measures with, so they say what the paper's orderings were, not what to expect here. The table
(`data/published.json`) says where each number was read.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

TITLE = "Published, other models and scorer (DeStein's paper, Perspective API; not measured here)"
HEADER = ["model", "method", "EMT", "TP", "PPL", "PPL x", "dist-2"]


@cache
def published() -> dict[str, Any]:
    """The shipped table: "about", "source" and one row per (model, prompt subset, method)."""
    path = resources.files("destein_lens").joinpath("data", "published.json")
    return json.loads(path.read_text(encoding="utf-8"))


def published_rows(subset: str = "full") -> list[list[str]]:
    """Report rows for `subset` ("full", "toxic", "nontoxic"), each model's unsteered row first,
    perplexity also as a ratio to it."""
    rows = [r for r in published()["rows"] if r["subset"] == subset]
    base = {r["model"]: r["ppl"] for r in rows if "unsteered" in r["method"]}
    return [
        [
            r["model"],
            r["method"],
            f"{r['emt']:.3f}",
            f"{r['tp']:.3f}",
            f"{r['ppl']:.1f}",
            f"{r['ppl'] / base[r['model']]:.2f}",
            f"{r['dist2']:.3f}",
        ]
        for r in rows
    ]
