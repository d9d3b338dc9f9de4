"""`destein-lens figures`: every figure of the project rebuilt into one folder (HTML + PNG) with a README.

One function, `make_figures`, so the figures in the repository are always the output of one
command on one set of vectors: the built-in seed pairs split 80/20, the directions and probes
built on the 80 %, the held-out 20 % kept for the head attribution. Each figure is saved as soon
as it is drawn, so an interrupted run keeps what it finished. The analyses live in `analysis`;
this module runs them, saves what they draw and writes the README.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from transformer_lens.model_bridge import TransformerBridge

from . import views
from .analysis import (
    SWEEP_ALPHAS,
    generation_rows,
    geometry_figures,
    load_sweep,
    method_families,
    plottable_sweep,
    probe_figures,
    run_sweep,
)
from .errors import DesteinError
from .files import check_out_dir, write_atomic
from .models import DEFAULT_MODEL, load_model, load_record
from .pairs import builtin_seed_pairs
from .registry import DEFAULT_STRENGTH
from .vectors import build_vectors

# Heads starred on the probe maps: `vectors.ranking()[:TOP_K]`, the heads `steer(heads=TOP_K)` steers.
TOP_K = 16
# stem -> what the figure shows; also the README's order.
FIGURES: dict[str, str] = {
    "probe_accuracy": "Held-out accuracy of each head's linear probe on the bare pair texts, the "
    f"ranking DeStein steers by; the top {TOP_K} heads of that ranking (what `steer(heads={TOP_K})` "
    "steers) are starred, hover shows the direction norm.",
    "probe_accuracy_prefixed": "The same probes on the prefixed texts, the same heads starred. The "
    "last-k-token window reaches into the instruction prefix, so nearly every head 'separates' the "
    "classes from the prefix alone: the confound that makes prefixed probes useless for ranking heads.",
    "activation_geometry": "PCA of the top head's activations: toxic and non-toxic pair texts, the "
    "toxic texts again with steering on (all heads), and the detox direction drawn from the "
    "non-toxic centroid.",
    "top_heads_geometry": "The same view for the first six heads of that ranking, one PCA each.",
    "alpha_sweep": "Expected maximum toxicity and toxicity probability against perplexity across "
    "steering strength α, one line per method family, with the Pareto front.",
    "generation_comparison": "Demo prompts continued without and with steering (same seed), with "
    "their profanity-check toxicity.",
}


@dataclass(frozen=True)
class _Settings:
    """How much work each figure gets; `quick` is for tests and smoke runs."""

    n_pairs: int  # built-in seed pairs used, split 80/20 into vectors / attribution
    sweep_prompts: int
    sweep_samples: int
    sweep_alphas: tuple[float, ...]
    table_prompts: int
    max_new_tokens: int


_FULL = _Settings(50, 6, 3, SWEEP_ALPHAS, 6, 20)
_QUICK = _Settings(20, 2, 2, (0.1,), 2, 8)


def check_figures_inputs(
    out_dir: str | os.PathLike[str], sweep_json: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]] | None:
    """Everything about a `figures` run that can be wrong before the model loads; the sweep rows.

    `out_dir` must be a writable folder or one that can be created (not a file, not under one);
    `sweep_json`, if given, a benchmark sweep with at least one plottable row. Returns its rows
    (None without one), so a bad input costs one error line instead of minutes of model work.
    """
    check_out_dir(out_dir)
    if sweep_json is None:
        return None
    rows = load_sweep(sweep_json)
    if not plottable_sweep(rows)[0]:
        raise DesteinError(f"{sweep_json}: no sweep row has finite metrics, nothing to plot")
    return rows


class _Saver:
    """Saves each figure as it is drawn; after the first failed static export, HTML only.

    A missing or broken Chromium costs the PNGs, never the HTML figures: it is reported once
    (one line on stderr and in the README) and not retried for every figure.
    """

    def __init__(self, out: Path, formats: Sequence[str]) -> None:
        self.out = out
        self.formats = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
        self.paths: list[Path] = []
        self.skipped: str | None = None  # why static export was given up, once it was

    def __call__(self, stem: str, fig: go.Figure) -> None:
        try:
            self.paths.extend(views.save_figure(fig, self.out, stem, formats=self.formats))
        except views.StaticExportError as e:
            if "html" not in self.formats:
                raise
            self.formats, self.skipped = ("html",), e.reason
            print(f"static export skipped, figures saved as HTML only: {e.reason}", file=sys.stderr)
            self(stem, fig)


def make_figures(
    out_dir: str | Path = "figures",
    *,
    model: TransformerBridge | None = None,
    quick: bool = False,
    sweep_json: str | Path | None = None,
    sweep_rows: list[dict[str, Any]] | None = None,
    progress: bool = True,
    alpha: float = DEFAULT_STRENGTH,
    formats: Sequence[str] = ("html", "png"),
) -> list[Path]:
    """Regenerate every figure in `FIGURES` plus README.md into `out_dir`; returns the files written.

    `sweep_json` is a benchmark sweep (benchmarks/bench_detox.py's `sweep.json`); without it a small
    sweep on the demo prompts is run in a temporary folder. `sweep_rows` are its rows as
    `check_figures_inputs` returned them (the CLI checks before loading the model); without them
    the inputs are checked here, still before any model work. `alpha` is the all-heads steering
    strength of the geometry and generation figures. If static export fails (no Chromium, or one
    that will not start), the figures are still written as HTML and one line says why.
    """
    settings = _QUICK if quick else _FULL
    if sweep_json is not None:
        sweep_source = str(sweep_json)
    else:
        sweep_source = (
            "rows passed in" if sweep_rows is not None else "a small sweep on the built-in demo prompts"
        )
    if sweep_rows is None:
        sweep_rows = check_figures_inputs(out_dir, sweep_json)  # fail before model work
    model = model or load_model()
    train, _ = builtin_seed_pairs().head(settings.n_pairs).split(0.8)
    vectors = build_vectors(model, train, progress=progress)
    out = Path(out_dir)
    save = _Saver(out, formats)
    bare, prefixed = probe_figures(vectors, top_k=TOP_K)
    save("probe_accuracy", bare)
    save("probe_accuracy_prefixed", prefixed)
    geometry, top_heads = geometry_figures(model, vectors, train, alpha=alpha, progress=progress)
    save("activation_geometry", geometry)
    save("top_heads_geometry", top_heads)
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
        + ([f"--alpha {alpha:g}"] if alpha != DEFAULT_STRENGTH else [])
        + (["--quick"] if quick else [])
    )
    facts = [
        f"model: {name}; site {vectors.site}, k = {vectors.k}",
        f"vectors: the first {vectors.n_pairs} of {settings.n_pairs} built-in seed pairs",
        "head attribution: `destein-lens figures --attribution DIR ...` draws a study folder's figures",
        f"geometry and generations: all heads steered at α = {alpha:g}",
        f"alpha sweep: {sweep_source}"
        + (f" (left out, no finite perplexity: {', '.join(left_out)})" if left_out else ""),
    ]
    if save.skipped:
        facts.append(f"static export skipped, figures saved as HTML only: {save.skipped}")
    save.paths.append(write_atomic(out / "README.md", _readme(command, facts, save.formats)))
    return save.paths


def compare_figures(
    folder: str | Path, out_dir: str | Path | None = None, formats: Sequence[str] = ("html", "png")
) -> list[Path]:
    """The Pareto figure(s) of a compare folder into `out_dir` (default: the folder itself).

    `pareto`: the evaluated cells, calibrated strengths starred, the budget dashed;
    `pareto_calibration` (calibrated runs): every strength tried on the calibration prompts;
    `pareto_<scorer>` for each further scorer of the folder: the evaluated cells by its toxicity.
    No model is needed: everything comes from the folder's metrics.json files.
    """
    from .compare import load_compare

    metrics = load_compare(folder)
    settings = metrics["compare"]
    chosen = [c["cell"] for c in settings["chosen"].values()]
    out = Path(out_dir or folder)
    save = _Saver(out, formats)
    curves = metrics.get("calibration")
    fig = views.pareto_figure(metrics, chosen=chosen, budget=settings["ppl_budget"], curves=curves)
    save("pareto", fig)
    figures = {
        "pareto": "EMT and TP of each evaluated cell against perplexity / unsteered perplexity, "
        "bootstrap 95% intervals over prompts, calibrated strengths starred"
        + (
            "; dotted, each method's whole curve over the strengths it tried in calibration."
            if curves
            else "."
        ),
    }
    for scorer in metrics.get("scorers", [])[1:]:
        title = f"Detoxification against fluency cost, toxicity by {scorer} (the same continuations)"
        fig = views.pareto_figure(
            metrics, chosen=chosen, budget=settings["ppl_budget"], title=title, scorer=scorer
        )
        save(f"pareto_{scorer}", fig)
        figures[f"pareto_{scorer}"] = (
            f"As `pareto`, with EMT and TP by {scorer}; strengths calibrated by {metrics['scorer']}."
        )
    if "calibration" in metrics:
        title = "Calibration: every strength tried, on the calibration prompts"
        fig = views.pareto_figure(
            metrics["calibration"], chosen=chosen, budget=settings["ppl_budget"], title=title
        )
        save("pareto_calibration", fig)
        figures["pareto_calibration"] = "Every strength of every method's grid on the calibration prompts."
    run = metrics["config"]
    protocol = run["eval"]
    facts = [
        f"model: {run['model']['name']}; scorer {metrics['scorer']}; {run['prompts']['n']} prompts x "
        f"{protocol['samples']} samples, {protocol['max_new_tokens']} new tokens, seed {protocol['seed']}",
        "cells: " + ", ".join(settings["cells"]),
    ]
    if settings["ppl_budget"] is not None:
        facts.append(
            f"calibrated at a {settings['ppl_budget']:g}x perplexity budget on "
            f"{settings['calibration_prompts']} other prompts"
        )
    if save.skipped:
        facts.append(f"static export skipped, figures saved as HTML only: {save.skipped}")
    command = f"destein-lens figures --compare {folder}" + (f" --out {out_dir}" if out_dir else "")
    save.paths.append(write_atomic(out / "README.md", _readme(command, facts, save.formats, figures)))
    return save.paths


_FIXED_ATTRIBUTION = {
    "top_heads": "Each ranking study's strongest heads, bootstrap 95% intervals over held-out pairs.",
    "dla_tokens": "The tokens the top DLA heads' detox moves promote and suppress, through W_O, the norms "
    "(linearised) and W_U.",
    "selection": "Gap effect of steering the top-k heads of the probe, causal (cross-fitted) and random "
    "rankings, with 95% bands; EMT of the evaluated k beside it.",
    "agreement": "Spearman's rho and top-8 overlap between the rankings, with bootstrap intervals.",
}


def attribution_figures(
    folders: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    formats: Sequence[str] = ("html", "png"),
) -> list[Path]:
    """The figures of attribution study folders (no model needed) and a README of their settings.

    One folder: its figures into `out_dir` (default `<folder>/figures`). Several (one per model):
    each folder's figures into `out_dir/<model name>/`, plus the cross-model depth figures.
    """
    from .attribution import load_study
    from .attribution.effects import rank_heads
    from .attribution.studies import ranked_results

    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if not folders:
        raise DesteinError("no attribution study folder given")
    studies = [load_study(f) for f in folders]
    labels = [Path(r.config["model"]["name"]).name.removesuffix(".gguf") for r in studies]
    if len(set(labels)) < len(labels):  # the same model twice (other settings): name them by folder
        labels = [Path(f).resolve().name for f in folders]
    single = len(folders) == 1
    out = Path(out_dir or Path(folders[0]) / "figures") if single else Path(out_dir or "figures/attribution")
    command = f"destein-lens figures --attribution {' '.join(map(str, folders))}" + (
        f" --out {out_dir}" if out_dir else ""
    )
    paths: list[Path] = []
    settings = []
    for folder, results, label in zip(folders, studies, labels):
        save, shown = _Saver(out if single else out / label, formats), {}
        probe_top = rank_heads(results.probe_accuracy)[:8]
        for name, effects in results.effects.items():
            save(f"grid_{name}", views.effect_grid(effects, marked=probe_top, marked_label="probe top-8"))
            shown[f"grid_{name}"] = (
                f"`{name}`: {effects.meaning}; per head, interval in the hover, probe top-8 starred."
            )
        ranked = {n: results.effects[n] for n in ranked_results() if n in results.effects}
        if ranked:
            save("top_heads", views.top_heads_figure(ranked))
        if results.dla is not None:
            save("dla_tokens", views.dla_tokens_figure(results.dla, results.dla.effects.ranking()[:6]))
        if results.selection is not None:
            save("selection", views.selection_figure(results.selection, results.evaluation))
        if results.agreement is not None:
            save("agreement", views.agreement_figure(results.agreement))
        saved = {path.stem for path in save.paths}
        shown.update({stem: text for stem, text in _FIXED_ATTRIBUTION.items() if stem in saved})
        cfg = results.config
        settings.append(
            f"{label}: {cfg['model']['n_layers']} layers x {cfg['model']['n_heads']} heads; vectors from "
            f"{cfg['vectors']['n_pairs']} pairs (k = {cfg['vectors']['k']}); {cfg['held_out']['n']} "
            f"held-out pairs from {cfg['held_out']['source']}; α = {cfg['settings']['alpha']:g}; study "
            f"folder {folder} (its report.md has the numbers)"
        )
        facts = [settings[-1], "intervals: 95% percentile bootstrap over the held-out pairs"]
        if save.skipped:
            facts.append(f"static export skipped, figures saved as HTML only: {save.skipped}")
        save.paths.append(write_atomic(save.out / "README.md", _readme(command, facts, save.formats, shown)))
        paths += save.paths
    if not single:
        save, shown = _Saver(out, formats), {}
        for name in ranked_results():
            if all(name in r.effects for r in studies):
                effects = {m: r.effects[name] for m, r in zip(labels, studies)}
                save(f"depth_{name}", views.depth_figure(effects))
                shown[f"depth_{name}"] = (
                    f"`{name}`: every head's mean effect against relative depth (layer / (n_layers - 1)), "
                    "one colour per model, a line through each layer's strongest head."
                )
        facts = [*settings, "each model's own figures are in its subfolder"]
        save.paths.append(write_atomic(out / "README.md", _readme(command, facts, save.formats, shown)))
        paths += save.paths
    return paths


def _readme(
    command: str, facts: Sequence[str], formats: Sequence[str], figures: dict[str, str] = FIGURES
) -> str:
    """What each figure shows, the exact command that rebuilt them, and the settings behind them."""
    static = "".join(f" and `<name>.{fmt}`" for fmt in formats if fmt != "html")
    lines = [
        "# Figures",
        "",
        f"Made by `{command}`: each figure as `<name>.html` (interactive; the HTML files share",
        f"`plotly.min.js` in this folder and open offline){static}.",
        "",
        *(f"- {fact}" for fact in facts),
        "",
        "| figure | what it shows |",
        "|---|---|",
        *(f"| [`{stem}`]({stem}.html) | {text} |" for stem, text in figures.items()),
    ]
    return "\n".join(lines) + "\n"
