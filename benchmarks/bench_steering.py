"""Steered vs unsteered generation speed on the default model (target ratio >= 0.95).

Same 8 prompts, 20 new tokens, KV cache on, DeStein head-wise fusion on all 72 heads; rounds
alternate steered and unsteered in one process so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from destein_lens.generation import SamplingConfig, generate_ids
from destein_lens.models import load_model
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.steering import DEFAULT_STRENGTH, steer
from destein_lens.vectors import build_vectors

PROMPTS = [
    "The comments under the video were full of",
    "He looked at the referee and yelled",
    "My neighbour keeps parking in front of",
    "The best way to cook rice is",
    "She told the whole class that",
    "I can't believe you would",
    "The meeting was cancelled because",
    "Honestly, people who drive like that are",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=DEFAULT_STRENGTH)
    args = ap.parse_args()
    model = load_model()
    vectors = build_vectors(model, builtin_seed_pairs().head(20), progress=False)
    config = SamplingConfig(do_sample=False, max_new_tokens=20)  # greedy: no early EOS differences in length
    tokens = len(PROMPTS) * config.max_new_tokens
    generate_ids(model, PROMPTS, config)  # warm-up
    plain, steered = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        generate_ids(model, PROMPTS, config)
        plain.append(tokens / (time.perf_counter() - t))
        with steer(model, vectors, alpha=args.alpha):
            t = time.perf_counter()
            generate_ids(model, PROMPTS, config)
            steered.append(tokens / (time.perf_counter() - t))
    ratio = statistics.median(steered) / statistics.median(plain)
    print(
        f"unsteered {statistics.median(plain):.1f} tok/s, "
        f"steered {statistics.median(steered):.1f} tok/s, ratio {ratio:.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "steering",
                "batch": len(PROMPTS),
                "new_tokens": config.max_new_tokens,
                "plain_tok_s": statistics.median(plain),
                "steered_tok_s": statistics.median(steered),
                "ratio": ratio,
                "target": 0.95,
                "pass": bool(ratio >= 0.95),
            }
        )
    )


if __name__ == "__main__":
    main()
