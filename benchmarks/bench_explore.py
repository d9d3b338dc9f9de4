"""The explorer's response time on the default model: one prompt, 4 samples of 20 new tokens.

A response is what the page waits for after a strength move or a head click: the steered side is
sampled and shown with its toxicity (`text_s`), then both sides' tokens are teacher-forced under
the other model for the shading and the perplexities (`response_s`, the whole response); the
unsteered side is kept from the first request. `new_prompt_s` is a new prompt, both sides sampled.
Timed through the widget itself (`Explorer.run` then `wait`), so the background thread and the
rendering are included. `cpu_s` is the process's CPU time per response (all threads): on a shared
machine the wall time measures the load, the CPU time the work. The vectors are built in float32;
the explorer samples in `--dtype` (auto: `generation_dtype()`, as notebook 06 does). Target: about
3 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from destein_lens import build_vectors, explore, generation_dtype, load_model
from destein_lens.pairs import builtin_seed_pairs

PROMPTS = ["He looked at the referee and yelled", "Honestly, people who drive like that are"]
STRENGTHS = (0.05, 0.15, 0.1, 0.2, 0.08)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(explorer, change) -> dict[str, float]:
    """Make `change`, then time the draft (texts and toxicity) and the whole response."""
    drafted: list[float] = []
    watch = lambda c: "perplexity …" in c["new"] and drafted.append(time.perf_counter())  # noqa: E731
    explorer.output.observe(watch, "value")
    start, cpu = time.perf_counter(), _cpu()
    change()
    explorer.wait()
    end = time.perf_counter()
    explorer.output.unobserve(watch, "value")
    assert explorer.status.value.startswith("done") and drafted, explorer.status.value
    return {"text_s": drafted[0] - start, "response_s": end - start, "cpu_s": _cpu() - cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="strength moves timed (plus one head click)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args = ap.parse_args()
    model = load_model()
    vectors = build_vectors(model, builtin_seed_pairs().head(20), progress=False)
    dtype = generation_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype != torch.float32:
        model = load_model(dtype=dtype)
    load = os.getloadavg()[0]
    explorer = explore(model, vectors, PROMPTS, samples=4, max_new_tokens=20)
    explorer.wait()  # the first request: loads the scorer, warms the model
    cold = _timed(explorer, lambda: explorer.examples.set_trait("value", 1))
    runs = [
        _timed(explorer, lambda a=alpha: explorer.strength.set_trait("value", a))
        for alpha in STRENGTHS[: args.rounds]
    ]
    runs.append(_timed(explorer, lambda: explorer.toggle(*vectors.ranking()[0])))  # a head click
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(
        f"response {median['response_s']:.2f} s, texts shown after {median['text_s']:.2f} s, "
        f"{median['cpu_s']:.2f} CPU s (median of {len(runs)}: strength moves and a head click); "
        f"new prompt {cold['response_s']:.2f} s; {dtype}, {torch.get_num_threads()} threads, load average "
        f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        json.dumps(
            {
                "bench": "explore",
                "samples": explorer.sampling.n,
                "new_tokens": explorer.sampling.max_new_tokens,
                "dtype": str(dtype).removeprefix("torch."),
                **median,
                "runs": runs,
                "new_prompt": cold,
                "threads": torch.get_num_threads(),
                "load_average_before": load,
                "load_average_after": os.getloadavg()[0],
                "target_s": 3.0,
                "pass": bool(median["response_s"] <= 3.0),
            }
        )
    )


if __name__ == "__main__":
    main()
