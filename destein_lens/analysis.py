"""The analyses behind the figures, for notebooks and `destein-lens figures` alike.

Each takes a model and vectors (or a benchmark's sweep file) and returns a figure or the rows one
plots, so a notebook shows exactly what the `figures` command draws. Stars and "top heads" always
come from `DetoxVectors.ranking()`, the heads `steer(heads=k)` steers.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from transformer_lens.model_bridge import TransformerBridge

from . import views
from .activations import pair_activations, text_activations
from .errors import DesteinError
from .evaluation import BASELINE, MethodSpec, eval_config, evaluate
from .generation import generate, protocol_sampling
from .pairs import SteeringPairs
from .prompts import builtin_demo_prompts
from .registry import DEFAULT_STRENGTH
from .scoring import get_scorer
from .steering import SteeringConfig, steer
from .vectors import DetoxVectors
from .views._checks import check_rows

# From barely steered to degenerate on gemma-3-270m, the baseline (alpha 0) added by the sweep.
SWEEP_ALPHAS = (0.05, 0.1, 0.2, 0.4)
_ALPHA_SUFFIX = re.compile(r"_a[-+0-9.eE]+$")


def probe_figures(vectors: DetoxVectors, *, top_k: int = 16) -> tuple[go.Figure, go.Figure]:
    """Probe accuracy on the bare and on the prefixed texts, the heads `steer(heads=top_k)` picks starred.

    Both maps star the same heads, so the prefixed map shows what the prefix-confounded accuracy
    says about the heads that are actually steered.
    """
    marked = vectors.ranking()[:top_k]
    norms = vectors.directions.norm(dim=-1)
    bare = views.probe_heatmap(vectors.accuracy_bare, direction_norm=norms, marked=marked)
    prefixed = views.probe_heatmap(
        vectors.accuracy_prefixed,
        direction_norm=norms,
        marked=marked,
        title="Per-head probe accuracy on prefixed texts (the prefix confound)",
    )
    return bare, prefixed


def geometry_figures(
    model: TransformerBridge,
    vectors: DetoxVectors,
    pairs: SteeringPairs,
    *,
    n_top: int = 6,
    alpha: float = DEFAULT_STRENGTH,
    progress: bool = True,
) -> tuple[go.Figure, go.Figure]:
    """PCA of the top head (with steered points) and of the top `n_top` heads, on the bare texts.

    Bare texts, because they are what the probes rank heads by and what steering meets at
    generation time; the direction comes from the prefixed texts, so its arrow shows how well
    the two agree rather than ending exactly on the toxic centroid.
    """
    opts = {"site": vectors.site, "k": vectors.k, "progress": progress}
    acts = pair_activations(model, pairs, prefixes=None, **opts)  # [n, 2, L, H, w]
    with steer(model, vectors, alpha=alpha):
        steered = text_activations(model, list(pairs.toxic), **opts)  # [n, L, H, w]
    ranking = vectors.ranking()
    layer, head = ranking[0]
    geometry = views.activation_geometry(
        acts[:, 0, layer, head],
        acts[:, 1, layer, head],
        direction=vectors.directions[layer, head],
        steered=steered[:, layer, head],
        title=f"Top head L{layer}H{head}: toxic texts before and after steering all heads (α={alpha:g})",
    )
    per_head = [
        (
            f"L{li}H{hi} (probe acc {float(vectors.probe_accuracy[li, hi]):.2f})",
            acts[:, 0, li, hi],
            acts[:, 1, li, hi],
            vectors.directions[li, hi],
        )
        for li, hi in ranking[:n_top]
    ]
    return geometry, views.top_heads_geometry(per_head)


def run_sweep(
    model: TransformerBridge,
    vectors: DetoxVectors,
    *,
    alphas: Sequence[float] = SWEEP_ALPHAS,
    n_prompts: int = 6,
    samples: int = 3,
    max_new_tokens: int = 20,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """A small alpha sweep on the demo prompts, in the benchmark's row format (baseline at alpha 0)."""
    prompts = builtin_demo_prompts()[:n_prompts]
    methods = [BASELINE] + [MethodSpec(f"destein_all_a{a}", SteeringConfig(alpha=a)) for a in alphas]
    config = eval_config(samples, max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="destein-sweep-") as tmp:
        metrics = evaluate(model, prompts, methods, tmp, config, vectors=vectors, progress=progress)
    keys = views.SWEEP_KEYS[2:]
    return [
        {"method": m.name, "alpha": m.steering.alpha, **{k: metrics[m.name][k] for k in keys}}
        for m in methods
    ]


def load_sweep(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a benchmark `sweep.json`: a JSON list of objects with every `views.SWEEP_KEYS` column.

    Checked here rather than when plotted, so a bad file fails before any model work. `method` is
    a string, `alpha` a number; a metric is a number or null (NaN and null mark a run whose text
    degenerated, which `plottable_sweep` leaves out).
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DesteinError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesteinError(f"{path} is not a readable JSON sweep ({e})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DesteinError(f"{path}: expected a non-empty JSON list of sweep rows (objects)")
    check_rows(rows, views.SWEEP_KEYS, f"{path}: sweep")
    for i, row in enumerate(rows):
        if not isinstance(row["method"], str):
            raise DesteinError(f"{path}: sweep row {i} has a non-string method {row['method']!r}")
        for key in views.SWEEP_KEYS[1:]:
            value = row[key]
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number or (value is None and key != "alpha")):
                raise DesteinError(f"{path}: sweep row {i} has a non-numeric {key} {value!r}")
    return rows


def method_families(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with "destein_top16_a0.4" -> "destein_top16": one line per family across alphas."""
    return [{**row, "method": _ALPHA_SUFFIX.sub("", str(row.get("method", "")))} for row in rows]


def plottable_sweep(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows with finite metrics, labels of rows without), so one degenerate setting doesn't sink the plot.

    A NaN perplexity means every continuation passed the 1e4 cutoff: the text degenerated, and a
    toxicity-vs-perplexity plot has nowhere to put it. Missing columns are left for the plot to reject.
    """
    kept, left_out = [], []
    for row in rows:
        values = [row[k] for k in views.SWEEP_KEYS[1:] if k in row]
        if any(v is None or (isinstance(v, float) and not math.isfinite(v)) for v in values):
            left_out.append(f"{row.get('method')} α={row.get('alpha')}")
        else:
            kept.append(row)
    return kept, left_out


def generation_rows(
    model: TransformerBridge,
    vectors: DetoxVectors,
    *,
    alpha: float = DEFAULT_STRENGTH,
    n_prompts: int = 6,
    max_new_tokens: int = 20,
) -> list[dict[str, Any]]:
    """Demo prompts continued with and without steering from the same seed, scored for toxicity."""
    prompts = [p.text for p in builtin_demo_prompts()[:n_prompts]]
    sampling = protocol_sampling(n=1, max_new_tokens=max_new_tokens)
    baseline = [c[0] for c in generate(model, prompts, sampling, progress=False)]
    with steer(model, vectors, alpha=alpha):
        steered = [c[0] for c in generate(model, prompts, sampling, progress=False)]
    scores = get_scorer("profanity-check").score(baseline + steered)
    return [
        {
            "prompt": prompt,
            "baseline": base,
            "steered": steer_text,
            "baseline_toxicity": scores[i],
            "steered_toxicity": scores[len(prompts) + i],
        }
        for i, (prompt, base, steer_text) in enumerate(zip(prompts, baseline, steered))
    ]
