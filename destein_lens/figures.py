"""Every figure of the project, rebuilt into one folder (HTML + PNG) with a README saying what each shows.

One function, `make_figures`, so the figures in the repository are always the output of one
command (`destein-lens figures`) on one set of vectors: the built-in seed pairs split 80/20, the
directions and probes built on the 80 %, the held-out 20 % kept for the head attribution. Each
figure is saved as soon as it is drawn, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from transformer_lens.model_bridge import TransformerBridge

from . import views
from .activations import pair_activations, text_activations
from .attribution import attribution_figure, head_attribution
from .errors import DesteinError
from .evaluation import BASELINE, EvalConfig, MethodSpec, evaluate
from .files import write_atomic
from .generation import generate, protocol_sampling
from .models import DEFAULT_MODEL, load_model, load_record
from .pairs import SteeringPairs, builtin_seed_pairs
from .prompts import builtin_demo_prompts
from .scoring import get_scorer
from .steering import steer
from .vectors import DetoxVectors, build_vectors

# stem -> what the figure shows; also the README's order.
FIGURES: dict[str, str] = {
    "probe_accuracy": "Held-out accuracy of each head's linear probe on the bare pair texts, the "
    "ranking DeStein steers by; the top heads are starred, hover shows the direction norm.",
    "probe_accuracy_prefixed": "The same probes on the prefixed texts. The last-k-token window "
    "reaches into the instruction prefix, so nearly every head 'separates' the classes from the "
    "prefix alone: the confound that makes prefixed probes useless for ranking heads.",
    "activation_geometry": "PCA of the top head's activations: toxic and non-toxic pair texts, the "
    "toxic texts again with steering on (all heads), and the detox direction drawn from the "
    "non-toxic centroid.",
    "top_heads_geometry": "The same view for the six best heads by probe accuracy, one PCA each.",
    "head_attribution": "Effect of steering each head alone on the held-out toxic - non-toxic "
    "log-prob gap, next to the probe accuracy, with their Spearman rank correlation.",
    "alpha_sweep": "Expected maximum toxicity and toxicity probability against perplexity across "
    "steering strength α, one line per method family, with the Pareto front.",
    "generation_comparison": "Demo prompts continued without and with steering (same seed), with "
    "their profanity-check toxicity.",
}
_ALPHA_SUFFIX = re.compile(r"_a[-+0-9.eE]+$")


@dataclass(frozen=True)
class _Settings:
    """How much work each figure gets; `quick` is for tests and smoke runs."""

    n_pairs: int  # built-in seed pairs used, split 80/20 into vectors / attribution
    sweep_prompts: int
    sweep_samples: int
    sweep_alphas: tuple[float, ...]
    table_prompts: int
    max_new_tokens: int


# From barely steered to degenerate on gemma-3-270m, the baseline (alpha 0) added by the sweep.
SWEEP_ALPHAS = (0.05, 0.1, 0.2, 0.4)
_FULL = _Settings(50, 6, 3, SWEEP_ALPHAS, 6, 20)
_QUICK = _Settings(20, 2, 2, (0.1,), 2, 8)
# All-heads steering strength for the geometry and generation figures. On gemma-3-270m the
# benchmark sweep puts the useful range at 0.05-0.15 (perplexity x1.3 at 0.1, x3.7 at 0.15);
# by 0.4 the text degenerates. Single-head attribution uses its own, larger default.
FIGURE_ALPHA = 0.1


def make_figures(
    out_dir: str | Path = "figures",
    *,
    model: TransformerBridge | None = None,
    quick: bool = False,
    sweep_json: str | Path | None = None,
    progress: bool = True,
    alpha: float = FIGURE_ALPHA,
    formats: Sequence[str] = ("html", "png"),
) -> list[Path]:
    """Regenerate every figure in `FIGURES` plus README.md into `out_dir`; returns the files written.

    `sweep_json` is a benchmark sweep (benchmarks/bench_detox.py's `sweep.json`); without it a small
    sweep on the demo prompts is run in a temporary folder. `alpha` is the all-heads steering
    strength of the geometry and generation figures.
    """
    settings = _QUICK if quick else _FULL
    sweep_rows = load_sweep(sweep_json) if sweep_json is not None else None  # fail before model work
    model = model or load_model()
    train, held_out = builtin_seed_pairs().head(settings.n_pairs).split(0.8)
    vectors = build_vectors(model, train, progress=progress)
    out = Path(out_dir)
    paths: list[Path] = []

    def save(stem: str, fig: go.Figure) -> None:
        paths.extend(views.save_figure(fig, out, stem, formats=formats))

    top_k = min(16, vectors.probe_accuracy.numel())
    norms = vectors.directions.norm(dim=-1)
    save("probe_accuracy", views.probe_heatmap(vectors.accuracy_bare, direction_norm=norms, top_k=top_k))
    save(
        "probe_accuracy_prefixed",
        views.probe_heatmap(
            vectors.accuracy_prefixed,
            direction_norm=norms,
            top_k=top_k,
            title="Per-head probe accuracy on prefixed texts (the prefix confound)",
        ),
    )
    geometry, top_heads = geometry_figures(model, vectors, train, alpha=alpha, progress=progress)
    save("activation_geometry", geometry)
    save("top_heads_geometry", top_heads)
    attribution = head_attribution(model, vectors, held_out, progress=progress)
    save("head_attribution", attribution_figure(attribution, vectors))
    if sweep_rows is None:
        sweep_rows = run_sweep(
            model,
            vectors,
            alphas=settings.sweep_alphas,
            n_prompts=settings.sweep_prompts,
            samples=settings.sweep_samples,
            max_new_tokens=settings.max_new_tokens,
            progress=progress,
        )
    rows, left_out = plottable_sweep(method_families(sweep_rows))
    sweep = views.alpha_sweep(rows)
    if left_out:
        sweep.update_layout(title_subtitle_text=f"left out, no finite perplexity: {', '.join(left_out)}")
    save("alpha_sweep", sweep)
    table = generation_rows(
        model, vectors, alpha=alpha, n_prompts=settings.table_prompts, max_new_tokens=settings.max_new_tokens
    )
    save("generation_comparison", views.generation_table(table))
    name = load_record(model).name
    command = " ".join(
        ["destein-lens figures", f"--out {out}"]
        + ([f"--model {name}"] if name != DEFAULT_MODEL else [])
        + ([f"--sweep {sweep_json}"] if sweep_json is not None else [])
        + ([f"--alpha {alpha:g}"] if alpha != FIGURE_ALPHA else [])
        + (["--quick"] if quick else [])
    )
    facts = [
        f"model: {name}; site {vectors.site}, k = {vectors.k}",
        f"vectors: the first {vectors.n_pairs} of {settings.n_pairs} built-in seed pairs; the other "
        f"{len(held_out)} are the held-out pairs of the head attribution",
        f"head attribution: each head alone at α = {attribution.alpha:g}; Spearman ρ(effect, probe "
        f"accuracy) = {attribution.spearman:.3f}; unsteered gap {attribution.baseline_gap:.3f} nats/token",
        f"geometry and generations: all heads steered at α = {alpha:g}",
        "alpha sweep: "
        + (str(sweep_json) if sweep_json is not None else "a small sweep on the built-in demo prompts")
        + (f" (left out, no finite perplexity: {', '.join(left_out)})" if left_out else ""),
    ]
    paths.append(write_atomic(out / "README.md", _readme(command, facts)))
    return paths


def geometry_figures(
    model: TransformerBridge,
    vectors: DetoxVectors,
    pairs: SteeringPairs,
    *,
    alpha: float = FIGURE_ALPHA,
    n_top: int = 6,
    progress: bool = True,
) -> tuple[go.Figure, go.Figure]:
    """PCA of the top head (with steered points) and of the top `n_top` heads, on the bare texts.

    Bare texts, because they are what the probes rank heads by and what steering meets at
    generation time; the direction comes from the prefixed texts, so its arrow shows how well
    the two agree rather than ending exactly on the toxic centroid.
    """
    opts = {"site": vectors.site, "k": vectors.k, "progress": progress}
    acts = pair_activations(model, pairs, prefixes=None, **opts)  # [n, 2, L, H, w]
    with steer(model, vectors, alpha):
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
    methods = [BASELINE] + [MethodSpec(f"destein_all_a{a}", alpha=a) for a in alphas]
    config = EvalConfig(samples=samples, max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="destein-sweep-") as tmp:
        metrics = evaluate(model, prompts, methods, tmp, config, vectors=vectors, progress=progress)
    keys = views.SWEEP_KEYS[2:]
    return [{"method": m.name, "alpha": m.alpha, **{k: metrics[m.name][k] for k in keys}} for m in methods]


def load_sweep(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a benchmark `sweep.json` (a JSON list of objects); columns are checked when plotted."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DesteinError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DesteinError(f"{path} is not a readable JSON sweep ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DesteinError(f"{path}: expected a JSON list of sweep rows (objects)")
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
    alpha: float = FIGURE_ALPHA,
    n_prompts: int = 6,
    max_new_tokens: int = 20,
) -> list[dict[str, Any]]:
    """Demo prompts continued with and without steering from the same seed, scored for toxicity."""
    prompts = [p.text for p in builtin_demo_prompts()[:n_prompts]]
    sampling = protocol_sampling(n=1, max_new_tokens=max_new_tokens)
    baseline = [c[0] for c in generate(model, prompts, sampling, progress=False)]
    with steer(model, vectors, alpha):
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


def _readme(command: str, facts: Sequence[str]) -> str:
    """What each figure shows, the exact command that rebuilt them, and the settings behind them."""
    lines = [
        "# Figures",
        "",
        f"Made by `{command}`: each figure as `<name>.html` (interactive; the HTML files share",
        "`plotly.min.js` in this folder and open offline) and `<name>.png`.",
        "",
        *(f"- {fact}" for fact in facts),
        "",
        "| figure | what it shows |",
        "|---|---|",
        *(f"| [`{stem}`]({stem}.html) | {text} |" for stem, text in FIGURES.items()),
    ]
    return "\n".join(lines) + "\n"
