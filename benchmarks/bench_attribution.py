"""Attribution studies: the scoring forward, side by side, and the full study's wall time by study.

Every study is one forward of the held-out texts per head (or per head set), so its cost is the
cost of `heldout.score`. Part 1 times that set two ways, alternating, on the same batches: the
model's full logits (every position, padding included, then a vocabulary-wide logsumexp: the
first implementation) against `score` (real tokens only, a chunked online logsumexp). Part 2
(`--full`) runs the documented study (`destein-lens attribute` defaults: built-in seed pairs for
the vectors, 16 held-out pairs, every study) one study at a time into one folder and prints each
study's wall time. Target: the full study within 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from destein_lens.attribution import StudySettings, held_out, held_out_pairs, run_study, score
from destein_lens.attribution.heldout import SIDES
from destein_lens.models import load_model
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.prompts import builtin_demo_prompts
from destein_lens.vectors import build_vectors


@torch.no_grad()
def full_logits_set(model, held) -> None:
    """The first implementation of one scoring set: full logits, then log-probs from them."""
    for batch in held.batches:
        for name in SIDES:
            side = batch.side(name)
            logits = model(side.ids, attention_mask=side.mask, return_type="logits").float()
            norm = torch.logsumexp(logits, dim=-1)
            target = logits[:, :-1].gather(-1, side.ids[:, 1:, None])[..., 0] - norm[:, :-1]
            (target * side.mask[:, 1:]).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", default="../shared/data/paradetox/paradetox.tsv")
    ap.add_argument("--n-held-out", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also run the full study, study by study")
    ap.add_argument("--out", default="runs/bench_attribution")
    args = ap.parse_args()
    model = load_model()
    train = builtin_seed_pairs()
    pairs = held_out_pairs(args.held_out, args.n_held_out, train)
    held = held_out(model, pairs, batch_size=StudySettings().batch_size)
    score(model, held)  # warm-up
    times: dict[str, list[float]] = {"full logits": [], "score": []}
    for _ in range(args.rounds):
        for name, run in (
            ("full logits", lambda: full_logits_set(model, held)),
            ("score", lambda: score(model, held)),
        ):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"one scoring set, {len(pairs)} pairs: " + ", ".join(f"{n} {t:.2f} s" for n, t in median.items()))
    print(f"speed-up: {median['full logits'] / median['score']:.2f}x")
    result = {"pairs": len(pairs), "set_seconds": median, "speedup": median["full logits"] / median["score"]}
    if args.full:
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        vectors = build_vectors(model, train, progress=False)
        phases = {"vectors": time.perf_counter() - start}
        prompts = builtin_demo_prompts()[:10]
        for study in ("patching", "dla", "steering", "selection"):
            t0 = time.perf_counter()
            run_study(model, vectors, pairs, out, studies=(study,), prompts=prompts, progress=False)
            phases[study] = time.perf_counter() - t0
        phases["total"] = time.perf_counter() - start
        print("full study: " + ", ".join(f"{n} {t:.0f} s" for n, t in phases.items()))
        result["full_study_seconds"] = phases
    print(json.dumps(result))


if __name__ == "__main__":
    main()
