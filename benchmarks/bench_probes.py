"""Batched torch probes vs the released code's per-head sklearn loop, at GPT2-large scale.

Both methods fit the same problem (standardised features, C = 1 / l2, pair-level 80/20
split); sklearn runs its default lbfgs solver with the released code's max_iter=1000.
Default data is synthetic: 36 layers x 20 heads, 500 pairs x 2 sides, d_head 64, a few
heads clearly separable, some weakly, most not; paraphrase pairs share a content vector, as
real pairs share most of their text. `--acts PATH` runs the same comparison on a real
activation tensor (safetensors, key "acts", [n_pairs, 2, n_layers, n_heads, d_head]).
Each method runs --repeat times, interleaved, and its best wall time counts (other processes
on a shared machine only ever add time). The last line printed is one JSON object with the
measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from destein_lens.errors import DesteinError
from destein_lens.probes import ProbeResult, fit_probes


def synthetic_acts(
    n_pairs: int = 500, n_layers: int = 36, n_heads: int = 20, d_head: int = 64, seed: int = 0
) -> torch.Tensor:
    """[n_pairs, 2, n_layers, n_heads, d_head] with a realistic spread of probe accuracies.

    Per head, toxicity shifts the two sides of a pair apart along one random direction; the
    shift (in noise standard deviations) is large for 5% of heads, small for 25%, zero for
    the rest. Features have unequal scales, as attention outputs do.
    """
    gen = torch.Generator().manual_seed(seed)
    n_total = n_layers * n_heads
    kind = torch.rand(n_total, generator=gen)
    shift = torch.where(
        kind < 0.05,
        1.5 + 2.0 * torch.rand(n_total, generator=gen),
        torch.where(kind < 0.30, 0.6 * torch.rand(n_total, generator=gen), 0.0),
    )
    direction = torch.nn.functional.normalize(torch.randn(n_total, d_head, generator=gen), dim=-1)
    scale = torch.exp(0.5 * torch.randn(n_total, d_head, generator=gen))
    content = torch.randn(n_pairs, 1, n_total, d_head, generator=gen)
    noise = torch.randn(n_pairs, 2, n_total, d_head, generator=gen)
    side = torch.tensor([0.5, -0.5]).view(1, 2, 1, 1)  # toxic side first
    acts = (content + noise + side * shift[:, None] * direction) * scale
    return acts.view(n_pairs, 2, n_layers, n_heads, d_head)


def load_acts(path: Path) -> torch.Tensor:
    """The "acts" tensor of a safetensors file written by the activations step."""
    tensors = load_file(str(path))
    if "acts" not in tensors:
        raise DesteinError(f"{path}: no 'acts' tensor (found: {', '.join(sorted(tensors))})")
    return tensors["acts"]


def timed(acts: torch.Tensor, method: str) -> tuple[ProbeResult, float]:
    start = time.perf_counter()
    result = fit_probes(acts, method=method)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", type=Path, help="safetensors file with key 'acts'")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per method; the best counts")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    acts = synthetic_acts() if args.acts is None else load_acts(args.acts)
    n_pairs, _, n_layers, n_heads, d_head = acts.shape
    load_before = os.getloadavg()[0]
    # warm-up on a slice: first-call costs (sklearn import, thread pools) are not the solver's
    for method in ("torch", "sklearn"):
        fit_probes(acts[:, :, :1, :2], method=method)

    # interleaved, best of --repeat: both methods see the same background load
    torch_times, sklearn_times = [], []
    for _ in range(args.repeat):
        fast, seconds = timed(acts, "torch")
        torch_times.append(seconds)
        slow, seconds = timed(acts, "sklearn")
        sklearn_times.append(seconds)
    torch_s, sklearn_s = min(torch_times), min(sklearn_times)
    diff = (fast.accuracy - slow.accuracy).abs()
    k = min(36, n_layers * n_heads)
    figures = {
        "bench": "probes",
        "source": "synthetic" if args.acts is None else str(args.acts),
        "heads": n_layers * n_heads,
        "samples": 2 * n_pairs,
        "d_head": d_head,
        "test_pairs": fast.n_test_pairs,
        "threads": torch.get_num_threads(),
        "sklearn_solver": "lbfgs",
        "torch_s": round(torch_s, 3),
        "sklearn_s": round(sklearn_s, 3),
        "speedup": round(sklearn_s / torch_s, 2),
        "torch_runs_s": [round(t, 3) for t in torch_times],
        "sklearn_runs_s": [round(t, 3) for t in sklearn_times],
        "torch_mean_acc": round(fast.accuracy.mean().item(), 4),
        "sklearn_mean_acc": round(slow.accuracy.mean().item(), 4),
        "mean_abs_acc_diff": round(diff.mean().item(), 5),
        "max_abs_acc_diff": round(diff.max().item(), 4),
        "top_k": k,
        "top_k_overlap": len(set(fast.top_k(k)) & set(slow.top_k(k))),
        "loadavg_1m_before": round(load_before, 2),  # other processes on the box skew wall times
    }
    print(
        f"{figures['heads']} heads x {figures['samples']} samples x d_head {d_head} "
        f"({figures['source']}), {figures['threads']} threads"
    )
    print(f"torch   (batched Newton): {torch_s:7.2f} s  held-out mean acc {figures['torch_mean_acc']:.4f}")
    print(
        f"sklearn (lbfgs per head): {sklearn_s:7.2f} s  held-out mean acc {figures['sklearn_mean_acc']:.4f}"
    )
    print(
        f"speedup {figures['speedup']:.1f}x, mean |acc diff| {figures['mean_abs_acc_diff']:.5f}"
        f", max {figures['max_abs_acc_diff']:.4f}, top-{k} overlap {figures['top_k_overlap']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
