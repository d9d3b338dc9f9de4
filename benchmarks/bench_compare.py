"""Each compared method's steered generation speed against unsteered, side by side in one run.

Protocol sampling (nucleus 0.9), 20 new tokens, batch 32 (8 prompts x 4 samples, as `compare`
batches them), KV cache on, every registered method at its default strength and head selection
(`--methods` for fewer), the vectors built in float32 and the model then loaded in `--dtype` (auto:
what `compare` generates in here). The timed block includes entering `steer`, so per-prompt work
(self-detoxify's two prefixed forwards) is counted. Rounds alternate the unsteered model and each
method so machine load affects all alike; the median round counts. Target: ratio >= 0.9 for the
activation methods; the decoding-time methods' extra forwards (a prefixed copy of each row:
self-detoxify, preadd, lma; adapters run beside the model: dexperts, dapt, gedi; a datastore
search: goodtriever) are their methods' cost, reported as is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from destein_lens import generation_dtype
from destein_lens.generation import generate_ids, protocol_sampling
from destein_lens.models import load_model
from destein_lens.pairs import load_pairs
from destein_lens.prompts import builtin_demo_prompts
from destein_lens.registry import FORMS
from destein_lens.steering import SteeringConfig, steer
from destein_lens.vectors import build_vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--methods", default=",".join(FORMS), help="comma-separated (default: every registered one)"
    )
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args = ap.parse_args()
    methods = args.methods.split(",")
    model = load_model()
    fitted = [m for m in methods if FORMS[m].fit is not None]
    vectors = build_vectors(model, load_pairs(None), fit_forms=fitted, progress=False)
    dtype = generation_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype != torch.float32:
        model = load_model(dtype=dtype)
    sampling = protocol_sampling(n=4)
    texts = [p.text for p in builtin_demo_prompts()[:8] for _ in range(sampling.n)]
    configs = {
        m: SteeringConfig(
            alpha=FORMS[m].default_strength, heads=FORMS[m].default_heads(*vectors.shape), form=m
        )
        for m in methods
    }

    def timed(method: str | None) -> float:
        generators = [torch.Generator().manual_seed(i) for i in range(len(texts))]
        start = time.perf_counter()
        if method is None:
            new = generate_ids(model, texts, sampling, generators)
        else:
            with steer(model, vectors, configs[method], prompts=texts):
                new = generate_ids(model, texts, sampling, generators)
        return new.numel() / (time.perf_counter() - start)  # tokens per second

    timed(None)  # warm-up
    speeds: dict[str, list[float]] = {"unsteered": [], **{m: [] for m in methods}}
    for _ in range(args.rounds):
        for method in methods:
            speeds["unsteered"].append(timed(None))
            speeds[method].append(timed(method))
    plain = statistics.median(speeds["unsteered"])
    results = {}
    print(f"unsteered: {plain:.1f} tok/s (batch {len(texts)}, {sampling.max_new_tokens} new tokens, {dtype})")
    for method in methods:
        tok_s = statistics.median(speeds[method])
        results[method] = {"tok_s": tok_s, "ratio": tok_s / plain}
        print(f"{method:14s} {tok_s:7.1f} tok/s  ratio {tok_s / plain:.3f}")
    print(
        json.dumps(
            {
                "bench": "compare_speed",
                "dtype": str(dtype).removeprefix("torch."),
                "unsteered_tok_s": plain,
                "methods": results,
                "target": 0.9,
            }
        )
    )


if __name__ == "__main__":
    main()
