"""Compare: DeStein against the field's training-free methods, on the same prompts, seeds and scorer.

A comparison is one run folder (`evaluation.evaluate`) whose methods are cells, one per (method,
strength), named "<method>@<strength>", plus the unsteered "baseline". A head-wise method may also
be compared with its heads chosen by causal effect, "<method>:causal" (its top k heads by the
vectors' causal ranking, `heads="causal:k"`), k a second knob: cells
"<method>:causal<k>@<strength>". Every cell draws the same random numbers per (prompt, sample), so
differences between cells are the methods'. The folder resumes like any run folder: a finished
cell or prompt is never redone.

With a perplexity budget, each method's strength is calibrated first, on other prompts: every
strength of its grid runs on the calibration prompts (the folder's `calibration/` run folder),
and the chosen one is the strongest detoxification (lowest EMT, then TP, then the weaker
strength, then fewer heads) whose mean perplexity stays within `budget` x the unsteered model's
on those same prompts and whose distinct-2 stays at least `DIST_FLOOR` x the unsteered model's:
repetition *lowers* perplexity (Goodtriever at the reference's temperature on a small datastore
repeats itself at a perplexity below the baseline's), so a perplexity budget alone would choose
degenerate text. Only the chosen cells then run on the evaluation prompts. A method with no
strength within budget is evaluated at its weakest and flagged. With several calibration
seeds, each further seed is one more run folder (`calibration-seed<s>/`, other draws of the same
prompts); the choice is made on the seeds pooled, and each seed's own choice is reported beside
it, the choice's spread.

The defaults (`registry.Form.default_strength`) were calibrated this way on
`../shared/data/rtp/test_100.jsonl` (all 100 prompts, 2 samples each, profanity-check,
gemma-3-270m, seed 0) at a 1.2x budget, each method over its `grid`:

    destein-lens compare --prompts <50 held-out prompts> --calibration-prompts test_100.jsonl \
        --ppl-budget 1.2 --samples 2

(benchmarks/heldout_prompts.py writes the held-out prompts; benchmarks/README.md has the table
the strengths were chosen from). Two samples per prompt make the choice noisy: a neighbouring
grid point is often within the bootstrap interval of the chosen one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from . import distributed, runfolder
from .errors import DesteinError
from .evaluation import BASELINE, EvalConfig, MethodSpec, cell_rows, evaluate, samples_of
from .files import write_atomic
from .metrics import paired
from .prompts import Prompt
from .registry import FORMS, get_form
from .rescoring import rescored, with_scores
from .runfolder import METRICS_FILE
from .scoring import Scorer
from .steering import SteeringConfig, top_k
from .vectors import DetoxVectors

CALIBRATION_DIR = "calibration"
# "<form>:causal" is a head-wise form steering its top k heads by causal effect (`heads="causal:k"`),
# k one more knob: calibrated over CAUSAL_KS, else DEFAULT_CAUSAL_K.
CAUSAL = ":causal"
CAUSAL_KS = (4, 8, 16, 32)
# A calibrated cell keeps at least this share of the unsteered model's distinct-2 (module docstring).
# Steered cells of the comparison sit within 2% of it; a degenerate one falls below 0.8.
DIST_FLOOR = 0.9
DEFAULT_CAUSAL_K = 16
Grid = dict[str, list[tuple[float, int | None]]]  # method -> its (strength, causal k or None) cells


def method_form(method: str) -> str:
    """The registered form a compared method steers with ("destein:causal" -> "destein")."""
    return method.removesuffix(CAUSAL)


def is_causal(method: str) -> bool:
    return method.endswith(CAUSAL)


def vector_needs(methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """The forms the compared methods need fitted from the pairs, and those whose causal head
    ranking the vectors must hold."""
    forms = [method_form(m) for m in methods if m != "baseline"]
    fits = [f for f in dict.fromkeys(forms) if get_form(f).fit is not None]
    return fits, list(dict.fromkeys(method_form(m) for m in methods if is_causal(m)))


def parse_methods(text: str) -> list[str]:
    """ "baseline,destein,destein:causal,iti" -> the method names, checked against the registry."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise DesteinError("--methods names no method")
    for name in names:
        if name != "baseline" and method_form(name) not in FORMS:
            raise DesteinError(
                f"unknown method {name!r}; choose from baseline, {', '.join(FORMS)} (a head-wise one "
                f"also as <method>{CAUSAL})"
            )
        if is_causal(name) and not FORMS[method_form(name)].head_wise:
            raise DesteinError(f"{name}: {method_form(name)} does not act on heads, so has no causal heads")
    if len(set(names)) != len(names):
        raise DesteinError(f"--methods names a method twice: {text!r}")
    return names


def _per_method(
    items: Sequence[str], option: str, accepts: Callable[[str], bool], refused: str, number: type, noun: str
) -> dict[str, tuple]:
    """["name=v1,v2", ...] -> {name: (v1, v2)}: each name once and accepted, values distinct numbers."""
    grids: dict[str, tuple] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise DesteinError(f"{option} takes method=s1,s2,...; got {item!r}")
        if not accepts(name):
            raise DesteinError(f"{option} for {name!r}, which is not {refused}")
        if name in grids:
            raise DesteinError(f"{option} gives {name!r} twice")
        try:
            parsed = tuple(number(v) for v in values.split(","))
        except ValueError:
            raise DesteinError(f"{option}: {item!r} holds a value that is not {noun}") from None
        if len(set(parsed)) != len(parsed):
            raise DesteinError(f"{option}: {item!r} repeats a value")
        grids[name] = parsed
    return grids


def parse_strengths(items: Sequence[str], methods: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """["destein=0.05,0.1", "iti=5"] -> {"destein": (0.05, 0.1), "iti": (5.0,)}, each checked."""
    accepts = lambda name: name in methods and name != "baseline"  # noqa: E731
    grids = _per_method(items, "--strengths", accepts, "a compared steering method", float, "a number")
    for name, strengths in grids.items():
        for s in strengths:
            SteeringConfig(alpha=s, form=method_form(name))  # range per form
    return grids


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """ "0,1" -> (0, 1): the calibration seeds (checked by `check_calibration`)."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise DesteinError(f"--calibration-seeds takes seeds like 0,1; got {text!r}") from None


def parse_ks(items: Sequence[str], methods: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """["destein:causal=8,16"] -> {"destein:causal": (8, 16)}: the k grid of causal methods."""
    accepts = lambda name: name in methods and is_causal(name)  # noqa: E731
    grids = _per_method(items, "--ks", accepts, f"a compared <method>{CAUSAL}", int, "a whole number")
    for name, ks in grids.items():
        if min(ks) < 1:
            raise DesteinError(f"--ks for {name}: head counts must be at least 1, got {min(ks)}")
    return grids


def cell_grid(
    methods: Sequence[str],
    strengths: dict[str, tuple[float, ...]],
    calibrating: bool,
    ks: dict[str, tuple[int, ...]] | None = None,
) -> Grid:
    """Per steering method, its cells: the given strengths, else its calibration grid, else its
    default; for a causal method each strength at each k (given, `CAUSAL_KS` when calibrating,
    else `DEFAULT_CAUSAL_K`)."""
    grid: Grid = {}
    for name in methods:
        if name == "baseline":
            continue
        form = get_form(method_form(name))
        values = strengths.get(name) or (form.grid if calibrating else (form.default_strength,))
        if is_causal(name):
            counts = (ks or {}).get(name) or (CAUSAL_KS if calibrating else (DEFAULT_CAUSAL_K,))
            grid[name] = [(s, k) for s in values for k in counts]
        else:
            grid[name] = [(s, None) for s in values]
    return grid


def causal_heads(grid: Grid) -> set[str]:
    """Every "causal:k" head selection the grid's cells steer (checked against the model's shape)."""
    return {f"causal:{k}" for cells in grid.values() for _, k in cells if k is not None}


def calibration_config(config: EvalConfig, samples: int | None) -> EvalConfig:
    """The evaluation protocol with `samples` per calibration prompt (None: the same as `config`):
    more samples make the chosen cell steadier than the evaluation needs."""
    return config if samples is None else replace(config, sampling=replace(config.sampling, n=samples))


def calibration_runs(
    out_dir: Path, config: EvalConfig, samples: int | None = None, seeds: Sequence[int] | None = None
) -> list[tuple[Path, EvalConfig]]:
    """Each calibration run's folder and protocol, one per seed (default: the evaluation's seed).
    The first seed runs in `calibration/`, so a one-seed folder reads as it always did; each
    further seed in `calibration-seed<s>/`: other draws of the same prompts, to show how far the
    chosen cell moves with them."""
    tuned = calibration_config(config, samples)
    seeds = list(seeds) if seeds else [tuned.sampling.seed]
    folders = [out_dir / CALIBRATION_DIR, *(out_dir / f"{CALIBRATION_DIR}-seed{s}" for s in seeds[1:])]
    extra = sorted(f.name for f in set(calibration_folders(out_dir)[1:]) - set(folders))
    if extra:
        raise DesteinError(
            f"{out_dir} holds calibration runs under other seeds ({', '.join(extra)}); "
            "give them in --calibration-seeds or use another --out folder"
        )
    return [(f, replace(tuned, sampling=replace(tuned.sampling, seed=s))) for f, s in zip(folders, seeds)]


def calibration_folders(out_dir: Path) -> list[Path]:
    """The calibration run folders a compare folder may hold: `calibration/`, then one per further seed."""
    return [out_dir / CALIBRATION_DIR, *sorted(out_dir.glob(f"{CALIBRATION_DIR}-seed*"))]


POOLED = ("expected_max_toxicity", "toxicity_probability", "perplexity", "dist_2")


def pooled(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Calibration runs of the same cells and prompts under several seeds as one: each cell's EMT,
    TP, perplexity and distinct-2 averaged over the runs (equal sizes, so the mean over every draw)."""
    if len(runs) == 1:
        return dict(runs[0])
    cells = [n for n, m in runs[0].items() if isinstance(m, dict) and "expected_max_toxicity" in m]
    return {n: {k: float(sum(r[n][k] for r in runs) / len(runs)) for k in POOLED} for n in cells}


def cell_name(method: str, strength: float, k: int | None = None) -> str:
    """ "destein@0.05", or with a causal k "destein:causal16@0.05"."""
    return f"{method}{'' if k is None else k}@{strength:g}"


def check_cells(
    out_dir: Path,
    methods: Sequence[str],
    strengths: dict[str, tuple[float, ...]],
    *,
    calibrating: bool,
    ks: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse, before any model work, a compare folder that holds other cells than these.

    Without calibration the folder's cells are known; with it, the calibration folder's are, and
    the evaluated ones are one per method.
    """
    grid = cell_grid(methods, strengths, calibrating, ks)
    every = ["baseline", *(cell_name(m, s, k) for m, cells in grid.items() for s, k in cells)]
    calibrated = [(folder, _cell_names(folder)) for folder in calibration_folders(out_dir)]
    if calibrated[0][1] is not None and not calibrating:
        raise DesteinError(f"{out_dir} holds a calibrated comparison; use another --out folder")
    evaluated = _cell_names(out_dir)
    for folder, found, ok in (
        *((folder, found, found == every) for folder, found in calibrated),
        (out_dir, evaluated, _one_per_method(evaluated, grid) if calibrating else evaluated == every),
    ):
        if found is not None and not ok:
            raise DesteinError(
                f"{folder} holds another run (its cells: {', '.join(found)}); use another --out folder"
            )


def _cell_names(folder: Path) -> list[str] | None:
    """The method names of the run in `folder`, None for a fresh folder."""
    config = runfolder.read_config(folder)
    if config is None:
        return None
    methods = config.get("methods") if isinstance(config, dict) else None
    return [str(m.get("name")) for m in methods if isinstance(m, dict)] if isinstance(methods, list) else []


def _one_per_method(names: list[str] | None, grid: Grid) -> bool:
    """A calibrated comparison's evaluated cells: the baseline and one cell per method."""
    if names is None:
        return True
    steered = names[1:]
    return (
        names[:1] == ["baseline"]
        and len(steered) == len(grid)
        and all(n in {cell_name(m, s, k) for s, k in grid[m]} for n, m in zip(steered, grid))
    )


def cell(method: str, strength: float, shape: tuple[int, int], k: int | None = None) -> MethodSpec:
    """One (method, strength[, k]) cell: the method's own head selection, or its causal top k."""
    form = get_form(method_form(method))
    heads = f"causal:{k}" if k is not None else form.default_heads(*shape)
    steering = SteeringConfig(alpha=strength, heads=heads, form=form.name)
    return MethodSpec(cell_name(method, strength, k), steering)


def choose(metrics: dict[str, Any], cells: Sequence[MethodSpec], budget: float) -> tuple[MethodSpec, bool]:
    """The strongest detoxification within `budget` x the baseline's perplexity and `DIST_FLOOR` x
    its distinct-2 (module docstring)."""
    base = metrics["baseline"]
    within = [
        c
        for c in cells
        if metrics[c.name]["perplexity"] <= budget * base["perplexity"]
        and metrics[c.name]["dist_2"] >= DIST_FLOOR * base["dist_2"]
    ]
    if not within:
        return min(cells, key=lambda c: abs(c.steering.alpha)), False
    key = lambda c: (  # noqa: E731
        metrics[c.name]["expected_max_toxicity"],
        metrics[c.name]["toxicity_probability"],
        abs(c.steering.alpha),
        top_k(c.steering.heads) or 0,  # then fewer causal heads
    )
    return min(within, key=key), True


def check_calibration(
    prompts: Sequence[Prompt],
    calibration: Sequence[Prompt] | None,
    budget: float | None,
    samples: int | None = None,
    seeds: Sequence[int] | None = None,
) -> None:
    """A budget needs calibration prompts, none of which may be an evaluation prompt; seeds are
    distinct."""
    if budget is None:
        options = (
            (calibration, "--calibration-prompts"),
            (samples, "--calibration-samples"),
            (seeds, "--calibration-seeds"),
        )
        for given, flag in options:
            if given is not None:
                raise DesteinError(f"--calibration-{flag} is used only with --ppl-budget")
        return
    if seeds is not None and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise DesteinError(
            f"--calibration-seeds needs distinct seeds >= 0, got {','.join(map(str, seeds))!r}"
        )
    if not budget > 1.0:
        raise DesteinError(f"--ppl-budget is a perplexity ratio above 1 (e.g. 1.2), got {budget:g}")
    if calibration is None:
        raise DesteinError(
            "--ppl-budget needs --calibration-prompts (strengths are never tuned on --prompts)"
        )
    if not calibration:
        raise DesteinError("the calibration prompt set is empty")
    shared = {p.text for p in prompts} & {p.text for p in calibration}
    if shared:
        raise DesteinError(
            f"{len(shared)} calibration prompts are also evaluation prompts: strengths would be tuned "
            "on the prompts they are reported on"
        )


def compare(
    model: TransformerBridge,
    vectors: DetoxVectors,
    prompts: Sequence[Prompt],
    methods: Sequence[str],
    out_dir: str | Path,
    config: EvalConfig,
    *,
    strengths: dict[str, tuple[float, ...]] | None = None,
    ks: dict[str, tuple[int, ...]] | None = None,
    ppl_budget: float | None = None,
    calibration: Sequence[Prompt] | None = None,
    calibration_samples: int | None = None,
    calibration_seeds: Sequence[int] | None = None,
    scorer: Scorer | None = None,
    extra_scorers: Sequence[Scorer] = (),
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every cell (or, with `ppl_budget`, each method's calibrated cell); metrics.json's content.

    A causal method ("destein:causal") needs the form's causal ranking in `vectors`
    (`attribution.causal_rankings`; the CLI builds it). With several `calibration_seeds` the
    cell is chosen on the runs pooled, and each seed's own choice is kept beside it ("by_seed")."""
    check_calibration(prompts, calibration, ppl_budget, calibration_samples, calibration_seeds)
    grid = cell_grid(methods, strengths or {}, ppl_budget is not None, ks)
    cells = {name: [cell(name, s, vectors.shape, k) for s, k in values] for name, values in grid.items()}
    opts = {
        "vectors": vectors,
        "scorer": scorer,
        "extra_scorers": extra_scorers,
        "provenance": provenance,
        "progress": progress,
    }
    with runfolder.hold(out_dir) as out:
        chosen: dict[str, Any] = {}
        runs: list[tuple[Path, EvalConfig]] = []
        if ppl_budget is not None:
            every = [c for group in cells.values() for c in group]
            runs = calibration_runs(out, config, calibration_samples, calibration_seeds)
            tuned = [evaluate(model, calibration, [BASELINE, *every], f, c, **opts) for f, c in runs]
            for name, group in cells.items():
                best, within = choose(pooled(tuned), group, ppl_budget)
                chosen[name] = {"cell": best.name, "strength": best.steering.alpha, "within_budget": within}
                if len(runs) > 1:
                    chosen[name]["by_seed"] = {
                        str(c.sampling.seed): choose(t, group, ppl_budget)[0].name
                        for (_, c), t in zip(runs, tuned)
                    }
            evaluated = [next(c for c in cells[n] if c.name == chosen[n]["cell"]) for n in cells]
        else:
            evaluated = [c for group in cells.values() for c in group]
        metrics = evaluate(model, prompts, [BASELINE, *evaluated], out, config, **opts)
        names = [BASELINE.name, *(c.name for c in evaluated)]
        metrics["compare"] = {
            "methods": list(grid),
            "strengths": {name: sorted({s for s, _ in values}) for name, values in grid.items()},
            "ks": {name: sorted({k for _, k in values}) for name, values in grid.items() if is_causal(name)},
            "cells": {
                c.name: {
                    "method": _method_of(c.name, grid),
                    "strength": c.steering.alpha,
                    "heads": c.steering.heads,
                }
                for c in evaluated
            },
            "ppl_budget": ppl_budget,
            "dist_floor": DIST_FLOOR if ppl_budget is not None else None,
            "chosen": chosen,
            "calibration_prompts": len(calibration) if calibration is not None else None,
            "calibration_samples": calibration_samples or config.sampling.n
            if calibration is not None
            else None,
            "calibration_seeds": [c.sampling.seed for _, c in runs] or None,
            "paired": paired_table(out, names, prompts, config.threshold),
        }
        if extra_scorers:
            metrics["compare"]["paired_by_scorer"] = {
                s.name: paired_table(out, names, prompts, config.threshold, s) for s in extra_scorers
            }
        distributed.main_writes(lambda: write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=1)))
    return metrics


def chosen_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per calibrated method: its chosen cell, whether within budget, each seed's choice."""
    settings, lines = metrics["compare"], []
    for name, choice in settings["chosen"].items():
        limits = f"{settings['ppl_budget']:g}x perplexity and {DIST_FLOOR:g}x distinct-2"
        flag = "" if choice["within_budget"] else f" (none within {limits}; the weakest)"
        spread = ", ".join(f"seed {s}: {c}" for s, c in choice.get("by_seed", {}).items())
        lines.append(
            f"calibrated {name}: {choice['cell']}{flag}" + (f" (each seed alone: {spread})" if spread else "")
        )
    return lines


def _method_of(name: str, grid: Grid) -> str:
    return next(m for m, values in grid.items() if name in {cell_name(m, s, k) for s, k in values})


def paired_table(
    out: Path, cells: Sequence[str], prompts: Sequence[Prompt], threshold: float, scorer: Scorer | None = None
) -> dict[str, Any]:
    """Every steered cell against every other cell (baseline included), on the same prompts and
    draws: "<a> vs <b>" -> EMT and TP differences and the perplexity ratio, each (point, low, high)
    with a paired bootstrap interval over prompts, and whether a dominates b (`metrics.Paired`).
    Toxicity is the folder's scorer's, or `scorer`'s over the same continuations."""

    def rows(name: str) -> list[dict[str, Any]]:
        found = cell_rows(out, name, prompts)
        return found if scorer is None else with_scores(found, rescored(out, name, found, scorer))

    samples = {name: samples_of(rows(name)) for name in cells}
    table = {}
    for a in cells[1:]:
        for b in cells:
            if a != b:
                result = paired(*samples[a], *samples[b], threshold=threshold)
                table[f"{a} vs {b}"] = {**result.to_dict(), "dominates": result.dominates}
    return table


def load_compare(folder: str | Path) -> dict[str, Any]:
    """A finished compare folder's metrics.json (with its calibration's, if any)."""
    folder = Path(folder)
    metrics = _read_metrics(folder / METRICS_FILE, "not a finished compare folder")
    if "compare" not in metrics:
        raise DesteinError(f"{folder} is a run folder, not a compare folder (no 'compare' entry)")
    cells = metrics["compare"].get("cells") if isinstance(metrics["compare"], dict) else None
    if not isinstance(cells, dict) or any(not isinstance(metrics.get(n), dict) for n in ["baseline", *cells]):
        raise DesteinError(f"{folder / METRICS_FILE} is a damaged compare result; run the comparison again")
    tuned = calibration_folders(folder)
    if (tuned[0] / METRICS_FILE).exists():
        metrics["calibration"] = pooled(
            [_read_metrics(t / METRICS_FILE, "a damaged calibration") for t in tuned]
        )
    return metrics


def _read_metrics(path: Path, missing: str) -> dict[str, Any]:
    """A metrics.json as a dict; anything else is one line of error."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DesteinError(f"{path.parent} holds no {METRICS_FILE}: {missing}") from None
    except (OSError, ValueError) as e:
        raise DesteinError(f"{path} is unreadable ({type(e).__name__})") from None
    if not isinstance(metrics, dict):
        raise DesteinError(f"{path} is damaged (not a JSON object); run the comparison again")
    return metrics
