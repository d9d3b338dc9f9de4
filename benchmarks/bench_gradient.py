"""Gradient attribution against the exact per-head studies: agreement with intervals, and the speed-up.

On one model (default gemma-3-270m; `--model smollm2-135m` for the second), with vectors from the
built-in seed pairs and `--n-held-out` ParaDetox pairs they were not built on, this runs side by
side in one process: the exact patching study, the exact steering study (each head steered alone
at each `--alphas` strength) and `gradient_effects` (one forward and backward per batch and side),
timing each. Per pair of (exact, estimate): Spearman's rho of the head means and the top-k overlap,
with 95% bootstrap intervals over the held-out pairs (`agreement`), and the heads where the two
disagree most (largest rank difference among either's top 16), with both values. Targets (issue
24): at least 20x faster than the exact studies for every head, rho >= 0.8 against the exact
steering study. `--confirm K` adds `causal_rankings(confirm=K)` against the exact steering study
(the first order with its top K heads re-scored exactly: the fix for a model whose first order
fails at the top). Then how much the scoring pairs move the causal selection (`causal_rankings`):
the top-k heads cross-fitted on the built-in pairs (its two folds against each other), and
ranked on two disjoint sets of `--n-held-out` ParaDetox pairs, top-k overlaps between all of
them. Prints markdown tables and one JSON line; writes the JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from destein_lens.attribution import (
    agreement,
    causal_rankings,
    gradient_effects,
    held_out,
    held_out_pairs,
    patching_effects,
    steering_effects,
)
from destein_lens.attribution.effects import HeadEffects
from destein_lens.files import check_out_file, write_atomic
from destein_lens.models import load_model
from destein_lens.pairs import builtin_seed_pairs
from destein_lens.vectors import build_vectors

TOP = 16


def _timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _disagreements(exact: HeadEffects, estimate: HeadEffects, n: int = 5) -> list[dict]:
    """Heads in either top-`TOP` whose ranks differ most, with both means."""
    ranks = [{h: i for i, h in enumerate(e.ranking())} for e in (exact, estimate)]
    shown = set(exact.ranking()[:TOP]) | set(estimate.ranking()[:TOP])
    worst = sorted(shown, key=lambda h: -abs(ranks[0][h] - ranks[1][h]))[:n]
    return [
        {
            "head": f"L{layer}H{head}",
            "exact_rank": ranks[0][(layer, head)] + 1,
            "estimate_rank": ranks[1][(layer, head)] + 1,
            "exact": round(float(exact.mean()[layer, head]), 5),
            "estimate": round(float(estimate.mean()[layer, head]), 5),
        }
        for layer, head in worst
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--held-out", default="../shared/data/paradetox/paradetox.tsv")
    ap.add_argument("--n-held-out", type=int, default=16)
    ap.add_argument("--alphas", default="0.1", help="comma list of steering strengths (none: '')")
    ap.add_argument("--k", type=int, default=8, help="the top-k of the overlap")
    ap.add_argument("--select", type=int, default=16, help="the k of the causal selection")
    ap.add_argument(
        "--patching", action=argparse.BooleanOptionalAction, default=True, help="the patching part"
    )
    ap.add_argument(
        "--selection", action=argparse.BooleanOptionalAction, default=True, help="the selection part"
    )
    ap.add_argument(
        "--confirm",
        type=int,
        default=0,
        help="also rank by causal_rankings(confirm=K): the first order with its top K re-scored exactly",
    )
    ap.add_argument("--out", default="runs/bench_gradient.json")
    args = ap.parse_args()
    out = check_out_file(args.out)
    alphas = [float(a) for a in args.alphas.split(",") if a]
    model = load_model(args.model)
    train = builtin_seed_pairs()
    vectors = build_vectors(model, train, progress=False)
    held_pairs = held_out_pairs(args.held_out, args.n_held_out, train)
    held = held_out(model, held_pairs, batch_size=16)
    gradient_effects(model, vectors, held, k=vectors.k, progress=False)  # warm-up
    rows, seconds = [], {}
    if args.patching:
        exact, seconds["exact patching"] = _timed(
            lambda: patching_effects(model, held, k=vectors.k, progress=False)["patching"]
        )
        estimates, seconds["gradient"] = _timed(
            lambda: gradient_effects(model, vectors, held, k=vectors.k, progress=False)
        )
        rows.append(
            _row(
                "patching",
                exact,
                estimates["atp_patching"],
                seconds["exact patching"],
                seconds["gradient"],
                args.k,
            )
        )
    for alpha in alphas:
        estimates, t_grad = _timed(
            lambda alpha=alpha: gradient_effects(
                model, vectors, held, k=vectors.k, alpha=alpha, progress=False
            )
        )
        exact, t_steer = _timed(
            lambda alpha=alpha: steering_effects(model, vectors, held, alpha=alpha, progress=False)[
                "steering"
            ]
        )
        seconds[f"exact steering (alpha {alpha:g})"] = t_steer
        rows.append(
            _row(f"steering alpha {alpha:g}", exact, estimates["atp_steering"], t_steer, t_grad, args.k)
        )
        if args.confirm:  # the library's own path, on the same held-out pairs
            confirmed, t_conf = _timed(
                lambda alpha=alpha: causal_rankings(
                    model, vectors, train, held=held_pairs, alpha=alpha, confirm=args.confirm, progress=False
                ).causal["destein"]
            )
            effects = HeadEffects("confirmed", confirmed.values, "nats/token", "first order, top re-scored")
            name = f"steering alpha {alpha:g}, first order + exact top {args.confirm}"
            rows.append(_row(name, exact, effects, t_steer, t_conf, args.k))
    n_layers, n_heads = vectors.shape
    print(f"{args.model}: {n_layers * n_heads} heads, {len(held)} held-out pairs\n")
    print(
        f"| study | Spearman rho [95% CI] | top-{args.k} overlap [95% CI] | exact s | gradient s | speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        rho, ov = r["spearman"], r[f"top{args.k}_overlap"]
        print(
            f"| {r['study']} | {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}] | "
            f"{ov[0]:.2f} [{ov[1]:.2f}, {ov[2]:.2f}] | {r['exact_seconds']:.1f} | "
            f"{r['gradient_seconds']:.1f} | {r['exact_seconds'] / r['gradient_seconds']:.1f}x |"
        )
    result = {
        "model": args.model,
        "heads": n_layers * n_heads,
        "pairs": len(held),
        "seconds": seconds,
        "rows": rows,
    }
    if args.patching and alphas:  # one gradient pass gives both estimates
        both = seconds["exact patching"] + seconds[f"exact steering (alpha {alphas[0]:g})"]
        result["speedup_both"] = both / seconds["gradient"]
        print(f"\nboth exact studies / one gradient pass: {result['speedup_both']:.1f}x")
    for r in rows:
        print(f"\n{r['study']}: largest rank differences among either top {TOP}")
        for d in r["disagreements"]:
            print(f"  {d}")
    if args.selection:
        result["selection"] = _selection_stability(model, vectors, train, args)
        print(f"\ncausal top-{args.select} (destein) overlap between scoring pairs:")
        for name, value in result["selection"]["overlap"].items():
            print(f"  {name}: {value:.2f}")
    result["torch_threads"] = torch.get_num_threads()
    print(
        json.dumps(
            {
                "speedup_both": result.get("speedup_both"),
                **{r["study"]: round(r["spearman"][0], 3) for r in rows},
            }
        )
    )
    write_atomic(out, json.dumps(result, indent=1))


def _row(
    study: str, exact: HeadEffects, estimate: HeadEffects, exact_s: float, gradient_s: float, k: int
) -> dict:
    a = agreement({"exact": exact, "estimate": estimate}, k=k)
    return {
        "study": study,
        "spearman": [float(t[0, 1]) for t in (a.spearman, a.spearman_low, a.spearman_high)],
        f"top{k}_overlap": [float(t[0, 1]) for t in (a.overlap, a.overlap_low, a.overlap_high)],
        "exact_seconds": exact_s,
        "gradient_seconds": gradient_s,
        "disagreements": _disagreements(exact, estimate),
    }


def _selection_stability(model, vectors, train, args) -> dict:
    """Top-k by causal effect from three scorings: cross-fit on the vectors' pairs, and two
    disjoint sets of held-out pairs; their pairwise overlaps, and the two folds' own."""
    pool = held_out_pairs(args.held_out, 2 * args.n_held_out, train)
    halves = list(pool.split(0.5))
    scorings = {"cross-fit": causal_rankings(model, vectors, train, progress=False).causal["destein"]}
    for i, half in enumerate(halves):
        scorings[f"held-out {i + 1}"] = causal_rankings(
            model, vectors, train, held=half, progress=False
        ).causal["destein"]
    tops = {name: set(r.ranking()[: args.select]) for name, r in scorings.items()}
    names = list(tops)
    overlap = {
        f"{a} vs {b}": len(tops[a] & tops[b]) / args.select
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    overlap["cross-fit fold 1 vs fold 2"] = scorings["cross-fit"].fold_overlap(args.select)
    return {
        "overlap": overlap,
        "top": {
            name: [f"L{layer}H{head}" for layer, head in r.ranking()[: args.select]]
            for name, r in scorings.items()
        },
    }


if __name__ == "__main__":
    main()
