"""A steered cell's time against the baseline cell's, side by side, as `run` and `compare` spend it.

Each round evaluates the unsteered baseline and DeStein at its default (the main job's two cells)
on the same demo prompts and draws, each alone into a fresh run folder (`evaluation.evaluate`: decode,
score, perplexity), one after the other; rounds alternate which goes first, and medians count, so
machine load moves both alike. Each cell's time is split by wrapping the stages: decoding, the
perplexity (the baseline's from its own decoding steps, the steered cell's one pass of the unsteered
model per decoding batch: `perplexity.conditional_perplexity`), scoring. The model is loaded once
in the dtype `--dtype` names (auto: `destein_lens.dtypes`' measured choice). Target: steered within
1.3x of the baseline. The last line printed is one JSON object (with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from destein_lens import evaluation
from destein_lens.dtypes import choose_dtype
from destein_lens.evaluation import BASELINE, MethodSpec, eval_config, evaluate
from destein_lens.models import check_device, load_model
from destein_lens.pairs import load_pairs
from destein_lens.prompts import builtin_demo_prompts
from destein_lens.registry import get_form
from destein_lens.steering import SteeringConfig
from destein_lens.vectors import build_vectors

STAGES = {  # evaluation's functions -> the stage their time counts in (the rest: scoring, files)
    "generate_ids": "decode",
    "generate_scored": "decode",
    "conditional_perplexity": "perplexity",
    "perplexity_from_steps": "perplexity",
}


def timed_stages(into: dict[str, float]) -> None:
    """Wrap evaluation's stage functions so each call adds its seconds to `into`."""

    def wrap(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[STAGES[name]] += time.perf_counter() - start

        return wrapper

    for name in STAGES:
        setattr(evaluation, name, wrap(name, getattr(evaluation, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12, help="demo prompts (12 x 10 samples: 2 batches)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    device = check_device(None)
    choice = choose_dtype(args.dtype, device, generates=True, model=None)
    model = load_model(device=device)  # vectors from a float32 forward, as `run` builds them
    vectors = build_vectors(model, load_pairs(None), progress=False)
    if choice.dtype != "float32":
        model = load_model(device=device, dtype=choice.torch_dtype)
    prompts = builtin_demo_prompts()[: args.prompts]
    config = eval_config(args.samples, batch_size=64)
    steered = MethodSpec("destein", SteeringConfig(alpha=get_form("destein").default_strength))
    stages: dict[str, float] = defaultdict(float)
    timed_stages(stages)
    times: dict[str, list[dict[str, float]]] = {"baseline": [], "destein": []}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for method in (BASELINE, steered) if r % 2 == 0 else (steered, BASELINE):
                stages.clear()
                start = time.perf_counter()
                evaluate(
                    model,
                    prompts,
                    [method],
                    Path(root) / f"{r}-{method.name}",
                    config,
                    vectors=vectors,
                    progress=False,
                )
                total = time.perf_counter() - start
                times[method.name].append({"total": total, **stages, "other": total - sum(stages.values())})
    median = {
        name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in times.items()
    }
    ratio = statistics.median(s["total"] / b["total"] for s, b in zip(times["destein"], times["baseline"]))
    print(f"dtype {choice.dtype} ({choice.reason}); {len(prompts)} prompts x {args.samples} samples")
    for name, m in median.items():
        print(f"{name:9s} " + "  ".join(f"{k} {v:6.1f} s" for k, v in m.items()))
    print(f"steered / baseline: {ratio:.2f} (median of {args.rounds} rounds; target <= 1.3)")
    load_end = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "bench": "cells",
                "dtype": choice.dtype,
                "median_s": median,
                "steered_over_baseline": ratio,
                "rounds": times,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            }
        )
    )


if __name__ == "__main__":
    main()
