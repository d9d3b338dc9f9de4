"""Batched torch probes vs the released code's per-head sklearn loop, at GPT2-large scale.

Both methods fit the same problem (C = 1 / l2, pair-level 80/20 split), in both feature
settings: "standardised" (the default of `fit_probes`) and "raw" (the released code's: raw
activations into sklearn); sklearn runs its default lbfgs solver with max_iter=1000.
Default data is synthetic: 36 layers x 20 heads, 500 pairs x 2 sides, d_head 64, a few
heads clearly separable, some weakly, most not; paraphrase pairs share a content vector, as
real pairs share most of their text. `--real PAIRS` runs the same comparison on the default
model's real activations of those pairs ("builtin" seeds, or e.g. the ParaDetox TSV with
--max-pairs; bare texts, as probes are fitted by default), extracted once and kept in
runs/bench_probes/; `--acts PATH` on any activation tensor (safetensors, key "acts",
[n_pairs, 2, n_layers, n_heads, d_head]).
Each method runs --repeat times, interleaved, and its best wall time counts (other processes
on a shared machine only ever add time); each run starts after a 2 s pause, because the
worker threads one library leaves spinning would otherwise steal the cores of the next run,
and fits shorter than 0.25 s repeat back to back within a run, the fastest counting.
The last line printed is one JSON object with the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from sklearn.exceptions import ConvergenceWarning

from destein_lens.activations import pair_activations
from destein_lens.errors import DesteinError
from destein_lens.files import write_atomic
from destein_lens.models import load_model
from destein_lens.pairs import SteeringPairs, load_pairs
from destein_lens.probes import ProbeResult, fit_probes, train_pair_count

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench_probes"


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


def real_acts(spec: str, n_pairs: int | None, k: int = 8) -> Path:
    """The default model's bare-text head activations (last-k mean) of the pairs `spec` names
    (`load_pairs`: "builtin" seeds, a .jsonl/.tsv file), up to n_pairs of those whose two
    sides both have k tokens; extracted on first use and kept under runs/bench_probes/ (the
    model is loaded only then)."""
    pairs = load_pairs(spec)
    path = RUNS / f"{pairs.sha256()[:16]}_n{n_pairs}_k{k}.safetensors"
    if not path.exists():
        model = load_model()
        lengths = [len(ids) for ids in model.tokenizer(list(pairs.toxic + pairs.nontoxic)).input_ids]
        keep = [i for i in range(len(pairs)) if min(lengths[i], lengths[len(pairs) + i]) >= k][:n_pairs]
        pairs = SteeringPairs([pairs.toxic[i] for i in keep], [pairs.nontoxic[i] for i in keep], pairs.source)
        acts = pair_activations(model, pairs, prefixes=None, k=k)
        write_atomic(path, save({"acts": acts.contiguous()}))
    return path


# Long enough for the previous run's worker threads to go idle: after an sklearn run, 0.5 s
# still left the next torch run 35% slower than 2 s did.
SETTLE_S = 2.0


# Fits shorter than this run back to back until it has passed, and the fastest counts (as
# timeit does): a single 20 ms fit straight after the pause times the cores waking up as much
# as the solver (the built-in pairs' torch fit read 18 to 37 ms that way).
MIN_SAMPLE_S = 0.25


def timed(acts: torch.Tensor, method: str, standardize: bool) -> tuple[ProbeResult, float]:
    """One timing sample: the fastest of back-to-back fits filling MIN_SAMPLE_S (at least one)."""
    time.sleep(SETTLE_S)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < MIN_SAMPLE_S:
        begin = time.perf_counter()
        result = fit_probes(acts, method=method, standardize=standardize)
        best = min(best, time.perf_counter() - begin)
    return result, best


def compare(acts: torch.Tensor, standardize: bool, repeat: int) -> dict[str, object]:
    """Interleaved best-of-`repeat` timings of both methods, and how far their results agree."""
    torch_times, sklearn_times = [], []
    for _ in range(repeat):
        fast, seconds = timed(acts, "torch", standardize)
        torch_times.append(seconds)
        slow, seconds = timed(acts, "sklearn", standardize)
        sklearn_times.append(seconds)
    torch_s, sklearn_s = min(torch_times), min(sklearn_times)
    diff = (fast.accuracy - slow.accuracy).abs()
    return {
        "torch_s": round(torch_s, 4),
        "sklearn_s": round(sklearn_s, 4),
        "speedup": round(sklearn_s / torch_s, 2),
        "torch_runs_s": [round(t, 4) for t in torch_times],
        "sklearn_runs_s": [round(t, 4) for t in sklearn_times],
        "torch_mean_acc": round(fast.accuracy.mean().item(), 4),
        "sklearn_mean_acc": round(slow.accuracy.mean().item(), 4),
        "mean_abs_acc_diff": round(diff.mean().item(), 5),
        "max_abs_acc_diff": round(diff.max().item(), 4),
        "heads_differing": int((diff > 0).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--acts", type=Path, help="safetensors file with key 'acts'")
    source.add_argument(
        "--real", metavar="PAIRS", help="the default model's activations of these pairs: 'builtin' or a file"
    )
    parser.add_argument("--max-pairs", type=int, help="with --real: use at most this many pairs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method; the best counts")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.real is not None:
        args.acts = real_acts(args.real, args.max_pairs)
    acts = synthetic_acts() if args.acts is None else load_acts(args.acts)
    n_pairs, _, n_layers, n_heads, d_head = acts.shape
    load_before = os.getloadavg()[0]
    # warm-up on a slice: first-call costs (sklearn import, thread pools) are not the solver's
    for method in ("torch", "sklearn"):
        fit_probes(acts[:, :, :1, :2], method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs on raw features hits max_iter
        settings = {
            name: compare(acts, standardize, args.repeat)
            for name, standardize in (("standardised", True), ("raw", False))
        }
    figures = {
        "bench": "probes",
        "source": "synthetic" if args.acts is None else str(args.acts),
        "heads": n_layers * n_heads,
        "samples": 2 * n_pairs,
        "d_head": d_head,
        "train_rows": 2 * train_pair_count(n_pairs, 0.8),
        "threads": torch.get_num_threads(),
        "sklearn_solver": "lbfgs",
        **settings,
        "loadavg_1m_before": round(load_before, 2),  # other processes on the box skew wall times
    }
    print(
        f"{figures['heads']} heads x {figures['samples']} samples x d_head {d_head} "
        f"({figures['source']}), {figures['threads']} threads"
    )
    for name, m in settings.items():
        print(
            f"{name:>12}: torch {m['torch_s']:.3f} s, sklearn lbfgs loop {m['sklearn_s']:.3f} s, "
            f"speedup {m['speedup']:.1f}x; held-out mean acc {m['torch_mean_acc']:.4f} vs "
            f"{m['sklearn_mean_acc']:.4f}, mean |diff| {m['mean_abs_acc_diff']:.5f} "
            f"({m['heads_differing']} heads differ)"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
