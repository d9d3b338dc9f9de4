"""The study folder's report.md: the answers a researcher asks for, each with its interval.

Which heads carry toxicity (per study, heads whose interval excludes zero), how far the rankings
agree (does probe accuracy predict causal effect?), whether causal top-k selection beats probe
top-k at equal k (a paired interval of the difference), and which layers matter, by relative
depth so that models of different depth line up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .effects import HeadEffects

if TYPE_CHECKING:
    from .study import StudyResults

TOP = 5


def _ci(mean: float, low: float, high: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def study_report(results: StudyResults) -> str:
    """Markdown: settings, effects, agreement, selection, layers."""
    cfg = results.config
    model = cfg["model"]
    settings = results.settings
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    lines = [
        "# Head attribution study",
        "",
        f"- model: {model['name']} ({model['architecture']}, {n_layers} layers x {n_heads} heads, "
        f"d_head {model['d_head']})",
        f"- vectors: {cfg['vectors']['n_pairs']} pairs, last k = {cfg['vectors']['k']} positions",
        f"- held-out pairs: {cfg['held_out']['n']} from {cfg['held_out']['source']}",
        f"- steering with {settings.form} at strength alpha = {settings.alpha:g}; 95% percentile "
        "bootstrap intervals over held-out pairs",
        "",
        "Positive effects mean the head pushes towards toxicity (steering or removing it detoxifies).",
        "",
    ]
    if results.effects:
        lines += [
            "## Effects",
            "",
            "| result | unit | heads with CI > 0 / < 0 | top heads: mean [95% CI] |",
            "|---|---|---|---|",
        ]
        for name, eff in results.effects.items():
            mean, (low, high) = eff.mean(), eff.interval()
            top = ", ".join(
                f"L{layer}H{head} {_ci(*(float(t[layer, head]) for t in (mean, low, high)))}"
                for layer, head in eff.ranking()[:TOP]
            )
            lines.append(
                f"| {name} | {eff.unit} | {int((low > 0).sum())} / {int((high < 0).sum())} | {top} |"
            )
        lines += [""] + [f"- **{name}**: {eff.meaning}" for name, eff in results.effects.items()] + [""]
    if results.agreement is not None:
        a = results.agreement
        lines += [
            "## Agreement between rankings",
            "",
            f"| rankings | Spearman rho [95% CI] | top-{a.k} overlap [95% CI] |",
            "|---|---|---|",
        ]
        for i in range(len(a.rankings)):
            for j in range(i + 1, len(a.rankings)):
                rho = _ci(
                    float(a.spearman[i, j]), float(a.spearman_low[i, j]), float(a.spearman_high[i, j]), 2
                )
                ov = _ci(float(a.overlap[i, j]), float(a.overlap_low[i, j]), float(a.overlap_high[i, j]), 2)
                lines.append(f"| {a.rankings[i]} vs {a.rankings[j]} | {rho} | {ov} |")
        lines.append("")
    if results.selection is not None:
        lines += _selection_lines(results)
    lines += _layer_lines(results.effects, n_layers)
    return "\n".join(lines) + "\n"


def _selection_lines(results: StudyResults) -> list[str]:
    s = results.selection
    mean, (low, high) = s.mean(), s.interval()
    ks = [str(k) if k < s.ks[-1] else f"all ({k})" for k in s.ks]
    lines = [
        "## Selection curves",
        "",
        f"gap(unsteered) - gap(top-k steered), nats/token, on all {s.effect.shape[-1]} held-out pairs; "
        f"causal is cross-fitted over {len(s.orders)} folds (each steers the heads ranked on the others).",
        "",
        "| ranker | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for r, name in enumerate(s.rankers):
        cells = [_ci(float(mean[r, i]), float(low[r, i]), float(high[r, i])) for i in range(len(ks))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for one, other in (("causal", "probe"), ("gradient", "probe"), ("gradient", "causal")):
        if one in s.rankers and other in s.rankers:
            diff = s.effect[s.rankers.index(one)] - s.effect[s.rankers.index(other)]
            d = HeadEffects(f"{one}_minus_{other}", diff[None], "nats/token", "")
            dm, (dl, dh) = d.mean()[0], d.interval()
            cells = [_ci(float(dm[i]), float(dl[0, i]), float(dh[0, i])) for i in range(len(ks))]
            lines += [f"| **{one} - {other}** (paired) | " + " | ".join(cells) + " |"]
    lines.append("")
    if results.evaluation:
        lines += _evaluation_lines(results.evaluation)
    return lines


def _evaluation_lines(metrics: dict[str, Any]) -> list[str]:
    """The selection's generation runs: EMT and TP under each scorer the folder was scored with."""
    scorers = metrics.get("scorers") or [metrics.get("scorer", "profanity-check")]
    head = " | ".join(f"EMT ({s}) | TP ({s})" for s in scorers)
    lines = [
        "Generation (selection_eval/): expected max toxicity, toxicity probability, perplexity.",
        "",
        f"| method | {head} | PPL |",
        "|---|" + "---|---|" * len(scorers) + "---|",
    ]
    for name, m in metrics.items():
        if isinstance(m, dict) and "expected_max_toxicity" in m:
            each = [m["by_scorer"][s] if len(scorers) > 1 else m for s in scorers]
            cells = " | ".join(
                f"{t['expected_max_toxicity']:.3f} | {t['toxicity_probability']:.2f}" for t in each
            )
            lines.append(f"| {name} | {cells} | {m['perplexity']:.2f} |")
    return [*lines, ""]


def _layer_lines(effects: dict[str, HeadEffects], n_layers: int) -> list[str]:
    shown = [n for n in ("patching", "steering", "dla") if n in effects]
    if not shown:
        return []
    depth = torch.arange(n_layers) / max(n_layers - 1, 1)
    lines = [
        "## Layers by relative depth",
        "",
        "Largest head mean effect in each layer (relative depth = layer / (n_layers - 1)).",
        "",
        "| layer | depth | " + " | ".join(shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    best = {n: effects[n].mean().max(dim=1).values for n in shown}
    for layer in range(n_layers):
        lines.append(
            f"| {layer} | {depth[layer]:.2f} | "
            + " | ".join(f"{float(best[n][layer]):.4f}" for n in shown)
            + " |"
        )
    return lines + [""]
