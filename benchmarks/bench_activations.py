"""Activation extraction speed and memory on the default model.

Speed: pairs/s of `pair_activations` (run_with_cache on the 18 hook_z points, reduced batch by
batch) vs a plain forward over the same tokenised batches, measured in alternating rounds in one
process (target ratio >= 0.9). Memory: peak RSS of extraction over n and 4n pairs, each in a fresh
subprocess (target: flat, i.e. ratio close to 1, since batches are reduced and dropped as they go).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from destein_lens.activations import pair_activations
from destein_lens.models import load_model
from destein_lens.pairs import load_pairs

PARADETOX = Path(__file__).resolve().parents[2] / "shared" / "data" / "paradetox" / "paradetox.tsv"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(n_pairs: int) -> None:
    model = load_model()
    pairs = load_pairs(str(PARADETOX), max_pairs=n_pairs)
    before = peak_rss_mib()
    acts = pair_activations(model, pairs, prefixes=None, k=4, progress=False)
    print(
        json.dumps(
            {
                "n_pairs": n_pairs,
                "shape": list(acts.shape),
                "peak_rss_mib": peak_rss_mib(),
                "after_load_mib": before,
            }
        )
    )


@torch.no_grad()
def plain_forward(model, pairs, batch_size: int) -> None:
    texts = list(pairs.toxic) + list(pairs.nontoxic)
    for i in range(0, len(texts), batch_size):
        enc = model.tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left"
        )
        model(enc.input_ids, attention_mask=enc.attention_mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--memory-pairs", type=int, default=50)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        memory_worker(args.worker)
        return
    model = load_model()
    pairs = load_pairs(str(PARADETOX), max_pairs=args.pairs)
    ours, plain = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        pair_activations(model, pairs, prefixes=None, k=4, batch_size=args.batch_size, progress=False)
        ours.append(len(pairs) / (time.perf_counter() - t))
        t = time.perf_counter()
        plain_forward(model, pairs, args.batch_size)
        plain.append(len(pairs) / (time.perf_counter() - t))
    ratio = statistics.median(ours) / statistics.median(plain)
    print(
        f"extraction {statistics.median(ours):.2f} pairs/s, "
        f"plain forward {statistics.median(plain):.2f} pairs/s, ratio {ratio:.3f}"
    )
    mem = []
    for n in (args.memory_pairs, 4 * args.memory_pairs):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(n)], capture_output=True, text=True, check=True
        )
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"{n} pairs: peak RSS {mem[-1]['peak_rss_mib']:.0f} MiB "
            f"(after load {mem[-1]['after_load_mib']:.0f} MiB)"
        )
    growth = mem[1]["peak_rss_mib"] / mem[0]["peak_rss_mib"]
    print(
        json.dumps(
            {
                "bench": "activations",
                "pairs": len(pairs),
                "ours_pairs_s": statistics.median(ours),
                "plain_pairs_s": statistics.median(plain),
                "ratio": ratio,
                "target_ratio": 0.9,
                "peak_rss_mib": {str(m["n_pairs"]): m["peak_rss_mib"] for m in mem},
                "rss_growth_4x_pairs": growth,
                "pass": bool(ratio >= 0.9 and growth < 1.1),
            }
        )
    )


if __name__ == "__main__":
    main()
