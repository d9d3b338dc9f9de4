"""Roofline: the decode step against this machine's matmul throughput, and the main job by stage.

Part A, decode (`--decode`). For each dtype (float32, bfloat16; the model is loaded once per dtype),
thread count (`torch.set_num_threads`) and batch size B, a batch of B short prompts (12 to 15
tokens, left-padded) is prefilled and then decoded greedily exactly as
`destein_lens.generation.generate_ids` does it: one TransformerBridge forward per step with
`return_type="logits_and_cache"`, `logits_to_keep=1`, a `DynamicCache` and the step's
`positions.token_window`, so every hook fires. The step time is the median of `--steps` timed
forwards after `--warmup` untimed ones (argmax and bookkeeping untimed).

The bound, measured in the same run with the same dtype and thread count right after the steps:
the step's matmuls alone. Every weight matrix one step multiplies by (every `nn.Linear` of the
Hugging Face model, in model order: q, k, v, o, gate, up, down projections of each layer, then the
[vocab x d_model] unembedding), multiplied in sequence as a plain `x @ W.T` by an x of shape
[B, in_features], on the model's own weights, best of 5 passes. In sequence, not one shape
repeated, because that is how a step meets them: 170 to 670 MB of weights streamed from memory
each step, where a repeated single matrix would sit in cache and flatter the bound by 2-3x.
Attention over the KV cache, norms, rotary embeddings, hooks and Python are not in the bound: they
are what a real step adds, and "step / bound" measures them. GFLOP/s counts 2 x B x in x out.

Part B, the main job (`--main-job`): the documented `destein-lens run` (defaults: built-in pairs
and demo prompts, 10 samples, 20 tokens) end to end, as of `--base` (the code before the measured
dtype and the cut perplexity pass, checked out into a git worktree) and now, one after the other in
this run, each in a fresh process, with the wall time of each stage (model load, vector build,
decoding, perplexity, scoring, the rest) and of each cell (method) taken by wrapping those
functions, and each run's metrics side by side. Now runs twice: with its default `--dtype auto`
(the dtype its probe measures faster here, `destein_lens.dtypes`; the run folder's dtype.json is
printed) and with the other of float32 and bfloat16, so the speedup of the code and of the dtype,
and the metrics' change with the dtype against their bootstrap intervals, are read apart. Each
run's steered cell is timed against its baseline cell (the unsteered model's perplexity comes free
from the baseline's decoding steps; the steered cell's needs its own pass). With `--rounds N` the
three configurations run N times, interleaved, and medians count: on a shared machine the load
moves within one run, and a configuration timed only while it was high looks slow.

On a small machine shared with other work, two threads stall on each other whenever one is
descheduled (a 0.3 ms matmul then takes 5 to 8 ms), which inflates step and bound alike at 2
threads; the JSON records the load average before and after so such runs can be told apart.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

from destein_lens.models import load_model
from destein_lens.positions import token_window

PROMPTS = [
    "The city council met on Tuesday afternoon to discuss the new parking rules for",
    "When I walked into the kitchen this morning, I noticed that the",
    "Scientists have long argued about whether the ancient climate of Mars was",
    "My neighbour keeps telling everyone in the building that the landlord",
    "The best way to learn a new language as an adult is to",
    "After the match, the coach said the referee had been completely",
    "She opened the letter from her sister and read the first line:",
    "In the comments section under the video, people started calling him a",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (key in a row, column header, width, number format) of the printed table
COLUMNS = [
    ("dtype", "dtype", 9, ""),
    ("threads", "thr", 3, ""),
    ("batch", "B", 4, ""),
    ("step_ms", "step ms", 9, ".1f"),
    ("bound_ms", "bound ms", 9, ".1f"),
    ("step_over_bound", "step/bnd", 8, ".2f"),
    ("bound_fraction", "of bound", 8, ".2f"),
    ("tok_s", "tok/s", 8, ".1f"),
    ("matmul_gflop_s", "mm GFLOP/s", 10, ".1f"),
    ("step_gflop_s", "step GFLOP/s", 12, ".1f"),
]


@torch.no_grad()
def decode_step_times(model, batch: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each timed decode forward after a prefill, mirroring `generate_ids` with a cache."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc.input_ids.to(model.cfg.device), enc.attention_mask.to(model.cfg.device)
    prompt_len = ids.shape[1]
    with token_window(0, prompt_len):
        logits, cache = model(
            ids,
            attention_mask=mask,
            past_key_values=DynamicCache(),
            return_type="logits_and_cache",
            logits_to_keep=1,
        )
    times = []
    for _ in range(warmup + steps):
        token = logits[:, -1, :].float().argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        _sync(model)
        t = time.perf_counter()
        with token_window(ids.shape[1] - 1, prompt_len):
            logits, cache = model(
                token[:, None],
                attention_mask=mask,
                past_key_values=cache,
                return_type="logits_and_cache",
                logits_to_keep=1,
            )
        _sync(model)
        times.append(time.perf_counter() - t)
    return times[warmup:]


def _sync(model) -> None:
    """GPU work is asynchronous: wait for it before reading the clock."""
    if str(model.cfg.device).startswith("cuda"):
        torch.cuda.synchronize()


def step_matrices(model) -> list[torch.Tensor]:
    """Every weight a decode step multiplies by, in model order (the unembedding last, once)."""
    return [m.weight.detach() for m in model.original_model.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def matmul_bound(model, batch: int, passes: int = 5) -> tuple[float, float]:
    """(seconds, flops) of one step's matmuls alone at batch `batch`: the bound a step cannot beat."""
    weights = step_matrices(model)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    flops = sum(2.0 * batch * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    for _ in range(passes + 1):  # the first pass warms up
        _sync(model)
        t = time.perf_counter()
        for w in weights:
            inputs[w.shape[1]] @ w.T
        _sync(model)
        best = min(best, time.perf_counter() - t)
    return best, flops


def format_row(row: dict | None) -> str:
    """One line of the table; the header when `row` is None."""
    if row is None:
        return " ".join(f"{head:>{width}}" for _, head, width, _ in COLUMNS)
    return " ".join(f"{row[key]:>{width}{fmt}}" for key, _, width, fmt in COLUMNS)


def decode_roofline(
    batch_sizes: Sequence[int],
    threads: Sequence[int],
    dtypes: Sequence[str],
    steps: int = 8,
    warmup: int = 2,
    device: str = "cpu",
) -> list[dict]:
    """One row per (dtype, threads, batch): median step time against the matmul bound, printed as it goes."""
    rows = []
    default_threads = torch.get_num_threads()
    print(format_row(None), flush=True)
    try:
        for dtype in dtypes:
            model = load_model(device=device, dtype=DTYPES[dtype])
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for batch in batch_sizes:
                    step = statistics.median(decode_step_times(model, batch, steps, warmup))
                    bound, flops = matmul_bound(model, batch)
                    row = {
                        "dtype": dtype,
                        "threads": n_threads,
                        "batch": batch,
                        "step_ms": round(1000 * step, 3),
                        "bound_ms": round(1000 * bound, 3),
                        "step_over_bound": round(step / bound, 3),
                        "bound_fraction": round(bound / step, 3),
                        "tok_s": round(batch / step, 1),
                        "matmul_gflop_s": round(flops / bound / 1e9, 1),
                        "step_gflop_s": round(flops / step / 1e9, 1),
                        "matmul_gflop": round(flops / 1e9, 3),
                    }
                    rows.append(row)
                    print(format_row(row), flush=True)
            del model
    finally:
        torch.set_num_threads(default_threads)
    return rows


BASE = "a12c7d6"  # main before issue 28 (measured dtype, cut perplexity pass): "today" in its terms
# Runs the command line in this process with its stages and cells timed; argv: timing file, then the CLI's.
STAGE_DRIVER = """
import json, sys, time
import destein_lens
from destein_lens import cli, evaluation, models, scoring, vectors
totals = {"package": destein_lens.__file__, "cells": {}}
def timed(stage, fn, into=totals):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = stage(*args) if callable(stage) else stage
            into[key] = into.get(key, 0.0) + time.perf_counter() - t
    return wrapper
models.load_model = timed("load", models.load_model)
evaluation._run_method = timed(lambda model, prompts, method, *rest: method.name, evaluation._run_method,
                               totals["cells"])
vectors.build_vectors = timed("vectors", vectors.build_vectors)
try:  # the measured dtype (absent at the base revision)
    from destein_lens import dtypes
    dtypes.measure = timed("probe", dtypes.measure)
except ImportError:
    pass
for name, stage in [("generate_ids", "decode"), ("generate_scored", "decode"),
                    ("conditional_perplexity", "perplexity"), ("perplexity_from_steps", "perplexity"),
                    ("decode_continuations", "detokenise")]:
    if hasattr(evaluation, name):
        setattr(evaluation, name, timed(stage, getattr(evaluation, name)))
get_scorer = scoring.get_scorer
def timed_scorer(*args, **kwargs):
    scorer = get_scorer(*args, **kwargs)
    scorer.score = timed("scoring", scorer.score)
    return scorer
scoring.get_scorer = timed_scorer
t = time.perf_counter()
cli.main(sys.argv[2:])
totals["total"] = time.perf_counter() - t
open(sys.argv[1], "w").write(json.dumps(totals))
"""
STAGES = ("probe", "load", "vectors", "decode", "perplexity", "scoring", "detokenise")
METRICS = ("expected_max_toxicity", "toxicity_probability", "perplexity")


def main_job(base: str, extra: Sequence[str], rounds: int = 1) -> dict:
    """The main job at `base` and now (auto dtype, and the dtype auto did not pick), one after the
    other, `rounds` times interleaved: each configuration's medians of stages, cells and wall time,
    the median of its per-run steered/baseline ratio, and its metrics (the same in every round)."""
    repo = Path(__file__).resolve().parents[1]
    root = Path(tempfile.mkdtemp(prefix="bench_roofline_"))
    worktree = root / "base"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(worktree), base], check=True)
    runs = {  # `python -c` imports the package from its working directory first
        f"base {base}": (worktree, []),
        "now (auto)": (repo, []),
        "now, other": (repo, None),  # the dtype auto did not pick
    }
    every: dict[str, list[dict]] = {name: [] for name in runs}
    try:
        for _ in range(rounds):
            for name, (cwd, flags) in runs.items():
                if flags is None:
                    auto = every["now (auto)"][0]["dtype"]
                    flags = ["--dtype", "float32" if auto == "bfloat16" else "bfloat16"]
                every[name].append(
                    _run_main_job(cwd, [*extra, *flags], root / f"run{sum(map(len, every.values()))}")
                )
                print(
                    f"{name}: {every[name][-1]['wall_s']:.1f} s wall ({every[name][-1]['package']})",
                    flush=True,
                )
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(worktree)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    results = {name: _medians(done) for name, done in every.items()}
    names = list(results)
    print(f"{'stage (s)':<12}" + "".join(f"{n:>18}" for n in names))
    for stage in (*STAGES, "other", "total"):
        print(f"{stage:<12}" + "".join(f"{results[n]['stages_s'].get(stage, 0.0):>18.1f}" for n in names))
    print(f"{'wall':<12}" + "".join(f"{results[n]['wall_s']:>18.1f}" for n in names))
    for cell in dict.fromkeys(c for n in names for c in results[n]["cells_s"]):  # every run's cells
        print(
            f"{'cell ' + cell:<12}" + "".join(f"{results[n]['cells_s'].get(cell, 0.0):>18.1f}" for n in names)
        )
    print(f"{'dtype':<12}" + "".join(f"{results[n]['dtype']:>18}" for n in names))
    print(f"{'steered/base':<12}" + "".join(f"{results[n]['steered_over_baseline']:>18.2f}" for n in names))
    for n in names[1:]:
        print(
            f"speedup of {n} over {names[0]}: {results[names[0]]['wall_s'] / results[n]['wall_s']:.2f}x wall"
        )
    for method in ("baseline", "destein"):
        for n in names:
            m = results[n]["metrics"][method]
            emt, tp, ppl = (f"{m[k]:.3f} [{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]" for k in METRICS)
            print(f"{method:<9} {n:<20} EMT {emt}  TP {tp}  PPL {ppl}")
    return results


def _run_main_job(cwd: Path, argv: Sequence[str], out: Path) -> dict:
    """One `destein-lens run` in a fresh process from `cwd`'s package, its stages and cells timed."""
    timing = out.with_suffix(".json")
    command = [sys.executable, "-c", STAGE_DRIVER, str(timing), "run", *argv, "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(command, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    stages = json.loads(timing.read_text())
    stages["other"] = stages["total"] - sum(stages.get(k, 0.0) for k in STAGES)
    metrics = json.loads((out / "metrics.json").read_text())
    cells = stages.pop("cells")
    return {
        "wall_s": round(wall, 1),
        "package": stages.pop("package"),
        "loadavg": round(os.getloadavg()[0], 2),
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "cells_s": {k: round(v, 1) for k, v in cells.items()},
        "steered_over_baseline": round(cells["destein"] / cells["baseline"], 3),
        "dtype": metrics["config"]["model"]["dtype"],
        "dtype_record": _read_json(out / "dtype.json"),
        "metrics": {
            method: {k: metrics[method][k] for k in METRICS}
            | {f"{k}_ci": metrics[method].get(f"{k}_ci") for k in METRICS}
            for method in ("baseline", "destein")
        },
    }


def _medians(runs: Sequence[dict]) -> dict:
    """One configuration's runs as one: medians of the timings, the first run's metrics, every wall time."""
    median = lambda values: round(statistics.median(values), 3)  # noqa: E731
    return {
        **runs[0],
        "wall_s": median([r["wall_s"] for r in runs]),
        "stages_s": {k: median([r["stages_s"].get(k, 0.0) for r in runs]) for k in runs[0]["stages_s"]},
        "cells_s": {k: median([r["cells_s"][k] for r in runs]) for k in runs[0]["cells_s"]},
        "steered_over_baseline": median([r["steered_over_baseline"] for r in runs]),
        "runs": [{k: r[k] for k in ("wall_s", "loadavg", "cells_s", "steered_over_baseline")} for r in runs],
    }


def _read_json(path: Path) -> dict | None:
    """A run folder's file (dtype.json is newer than the base revision), or None."""
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 32, 64, 128], help="(default 8 32 64 128)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default 1 2)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per cell (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default 2)")
    parser.add_argument("--device", default="cpu", help="part A's device (default cpu; cuda: threads moot)")
    parser.add_argument("--decode", action="store_true", help="part A only")
    parser.add_argument("--main-job", action="store_true", help="part B only")
    parser.add_argument("--base", default=BASE, help=f"the revision to compare the main job with ({BASE})")
    parser.add_argument("--max-prompts", type=int, default=None, help="main job on fewer demo prompts")
    parser.add_argument(
        "--rounds", type=int, default=1, help="main job: every configuration this many times, interleaved"
    )
    args = parser.parse_args()
    both = not (args.decode or args.main_job)

    out: dict = {"bench": "roofline", "torch": torch.__version__, "loadavg_start": os.getloadavg()[0]}
    if args.decode or both:
        out["decode"] = decode_roofline(
            args.batch_sizes, args.threads, args.dtypes, args.steps, args.warmup, args.device
        )
    if args.main_job or both:
        extra = [] if args.max_prompts is None else ["--max-prompts", str(args.max_prompts)]
        out["main_job"] = main_job(args.base, extra, args.rounds)
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
