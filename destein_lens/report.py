"""The run folder's human side: the comparison table (terminal, Markdown, HTML) and example generations."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic
from .published import HEADER, TITLE, published, published_rows
from .runfolder import METRICS_FILE, gens_path

COLUMNS = (
    ("expected_max_toxicity", "EMT"),
    ("expected_max_toxicity_ci", "EMT 95% CI"),
    ("toxicity_probability", "TP"),
    ("toxicity_probability_ci", "TP 95% CI"),
    ("perplexity", "PPL"),
    ("perplexity_ci", "PPL 95% CI"),
    ("ppl_ratio", "PPL x"),
    ("dist_1", "dist-1"),
    ("dist_2", "dist-2"),
    ("dist_3", "dist-3"),
    ("n_prompts", "prompts"),
    ("samples", "samples"),
)


def methods_in(metrics: dict[str, Any]) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, dict) and "expected_max_toxicity" in v]


def table_rows(metrics: dict[str, Any], split: str | None = None) -> list[list[str]]:
    """One formatted row per method (optionally for the toxic / non-toxic prompt split)."""
    rows = []
    for method in methods_in(metrics):
        m = metrics[method] if split is None else metrics[method].get(split)
        if m is None:
            continue
        base = (
            (metrics["baseline"] if split is None else metrics["baseline"].get(split, {}))
            if "baseline" in metrics
            else {}
        )
        ratio = {"ppl_ratio": m["perplexity"] / base["perplexity"] if "perplexity" in base else float("nan")}
        rows.append([method] + [_fmt({**m, **ratio}.get(key, float("nan"))) for key, _ in COLUMNS])
    return rows


def scorer_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """EMT and TP with intervals per scorer (header, rows): the same continuations, each scorer's
    verdict side by side. Empty for a folder scored by one scorer."""
    scorers = metrics.get("scorers") or []
    if len(scorers) < 2:
        return [], []
    header = ["method"] + [f"{label} ({s})" for s in scorers for label in ("EMT [95% CI]", "TP [95% CI]")]
    rows = []
    for method in methods_in(metrics):
        cells = [method]
        for s in scorers:
            m = metrics[method]["by_scorer"][s]
            for key in ("expected_max_toxicity", "toxicity_probability"):
                cells.append(f"{_fmt(m[key])} {_fmt(m[f'{key}_ci'])}")
        rows.append(cells)
    return header, rows


def text_table(metrics: dict[str, Any]) -> str:
    """The comparison as aligned plain text, for the terminal."""
    header = ["method"] + [label for _, label in COLUMNS]
    rows = [header] + table_rows(metrics)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    s_header, s_rows = scorer_rows(metrics)
    if s_rows:
        rows = [s_header, *s_rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(s_header))]
        lines += ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)]
    return "\n".join([f"scorer: {metrics['scorer']}", *lines])


def examples(out_dir: Path, methods: Sequence[str], n: int = 5) -> list[dict[str, Any]]:
    """For the first n prompts: each method's most toxic continuation."""
    per_method = {}
    for method in methods:
        lines = gens_path(out_dir, method).read_text(encoding="utf-8").splitlines()
        per_method[method] = {row["prompt"]["id"]: row for row in map(json.loads, lines)}
    first = methods[0]
    out = []
    for pid, row in list(per_method[first].items())[:n]:
        item: dict[str, Any] = {"prompt": row["prompt"]["text"]}
        for method in methods:
            worst = max(per_method[method][pid]["generations"], key=lambda g: g["toxicity"])
            item[method] = (worst["text"], worst["toxicity"])
        out.append(item)
    return out


def write_report(out_dir: str | Path, n_examples: int = 5) -> list[Path]:
    """report.md and report.html from metrics.json and the generations."""
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / METRICS_FILE).read_text(encoding="utf-8"))
    methods = methods_in(metrics)
    header = ["method"] + [label for _, label in COLUMNS]
    md = [f"# destein-lens run\n\nToxicity scorer: `{metrics['scorer']}` (continuations only).\n"]
    sections = [("All prompts", None), ("Toxic prompts", "toxic"), ("Non-toxic prompts", "nontoxic")]
    html_parts = [
        f"<h1>destein-lens run</h1><p>Toxicity scorer: <code>{html.escape(metrics['scorer'])}</code></p>"
    ]
    for title, split in sections:
        rows = table_rows(metrics, split)
        if not rows:
            continue
        md += [f"## {title}\n", _md_table(header, rows), ""]
        html_parts += [f"<h2>{title}</h2>", _html_table(header, rows)]
    s_header, s_rows = scorer_rows(metrics)
    if s_rows:
        title = "Toxicity under each scorer (the same continuations)"
        md += [f"## {title}\n", _md_table(s_header, s_rows), ""]
        html_parts += [f"<h2>{html.escape(title)}</h2>", _html_table(s_header, s_rows)]
    settings = metrics.get("compare") if isinstance(metrics.get("compare"), dict) else {}
    if settings.get("chosen"):
        seeds = (
            ", seeds " + ", ".join(map(str, settings["calibration_seeds"]))
            if settings.get("calibration_seeds")
            else ""
        )
        title = (
            f"Calibration ({settings['calibration_prompts']} other prompts x "
            f"{settings['calibration_samples']} samples{seeds};"
            f" budget {settings['ppl_budget']:g}x perplexity)"
        )
        c_header, c_rows = (
            ["method", "chosen cell", "within budget", "each seed alone"],
            calibration_rows(settings),
        )
        md += [f"## {title}\n", _md_table(c_header, c_rows), ""]
        html_parts += [f"<h2>{html.escape(title)}</h2>", _html_table(c_header, c_rows)]
    tables = {metrics["scorer"]: settings.get("paired"), **settings.get("paired_by_scorer", {})}
    for scorer, paired in tables.items():
        if not paired:
            continue
        under = f"; toxicity by {scorer}" if len(tables) > 1 else ""
        title = (
            f"Paired differences (same prompts and draws; 95% paired bootstrap intervals over prompts{under})"
        )
        p_header = ["a vs b", "EMT(a) - EMT(b)", "TP(a) - TP(b)", "PPL(a) / PPL(b)", "verdict"]
        p_rows = paired_rows(paired)
        md += [f"## {title}\n", _md_table(p_header, p_rows), ""]
        html_parts += [f"<h2>{html.escape(title)}</h2>", _html_table(p_header, p_rows)]
    if settings:
        note = published()["source"]
        md += [f"## {TITLE}\n", note, "", _md_table(HEADER, published_rows()), ""]
        html_parts += [
            f"<h2>{html.escape(TITLE)}</h2><p>{html.escape(note)}</p>",
            _html_table(HEADER, published_rows()),
        ]
    samples = examples(out_dir, methods, n_examples)
    md.append("## Most toxic continuation per prompt (first prompts)\n")
    html_parts.append("<h2>Most toxic continuation per prompt (first prompts)</h2>")
    ex_header = ["prompt"] + methods
    ex_rows = [[s["prompt"]] + [f"{s[m][0]!r} ({s[m][1]:.2f})" for m in methods] for s in samples]
    md.append(_md_table(ex_header, ex_rows))
    html_parts.append(_html_table(ex_header, ex_rows))
    page = "<!doctype html><meta charset='utf-8'><title>destein-lens run</title>" + "".join(html_parts)
    return [
        write_atomic(out_dir / "report.md", "\n".join(md) + "\n"),
        write_atomic(out_dir / "report.html", page),
    ]


def calibration_rows(settings: dict[str, Any]) -> list[list[str]]:
    """Per calibrated method: the cell chosen on the seeds pooled, and each seed's own choice
    (the same cell under every seed: a steady choice)."""
    return [
        [
            name,
            choice["cell"],
            "yes" if choice["within_budget"] else "no: the weakest",
            ", ".join(f"{seed}: {cell}" for seed, cell in choice.get("by_seed", {}).items()) or "one seed",
        ]
        for name, choice in settings["chosen"].items()
    ]


def paired_rows(paired: dict[str, Any]) -> list[list[str]]:
    """One row per "a vs b" entry; the verdict says "dominates" only when both intervals clear
    no-difference in a's favour, "less toxic" when EMT's alone does."""
    rows = []
    for name, d in paired.items():
        emt, ppl = d["emt_diff"], d["ppl_ratio"]
        if d["dominates"]:
            verdict = "dominates"
        elif emt[2] < 0:
            verdict = "less toxic" + (", less fluent" if ppl[1] > 1 else "")
        elif emt[1] > 0:
            verdict = "more toxic"
        else:
            verdict = "no clear EMT difference"
        rows.append([name, *(f"{_fmt(v[0])} {_fmt(v[1:])}" for v in (emt, d["tp_diff"], ppl)), verdict])
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, list):  # an interval
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"
