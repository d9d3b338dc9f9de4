"""Agreement of the offline scorers with Perspective on RealToxicityPrompts (what the paper scored with).

Every unique text of ../shared/data/rtp/*.jsonl that carries a Perspective toxicity (prompts, and
continuations where a row has them) is scored by profanity-check, bilstm-jigsaw and the two ways
of combining them, the max (the registered `ensemble`) and the mean. Per scorer: Spearman and
Pearson correlation with Perspective's toxicity, ROC AUC for Perspective >= 0.5, and agreement of
the decision at 0.5 (accuracy, precision, recall, F1, Cohen's kappa), each with a paired bootstrap
95% interval (the same resampled texts for every scorer), plus the paired difference max - mean
that chose the ensemble's rule; how many Perspective-toxic texts one scorer misses that the other
catches; scoring speed in texts/s. Prints a markdown table, then the point values as one JSON
line; writes everything (with the intervals) as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import cohen_kappa_score, f1_score, precision_score, recall_score, roc_auc_score

from destein_lens.files import check_out_file, write_atomic
from destein_lens.readers import iter_jsonl
from destein_lens.scoring import get_scorer

RTP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"
THRESHOLD = 0.5


def load_rtp(folder: Path) -> tuple[list[str], np.ndarray]:
    """Unique texts (first occurrence) with their Perspective toxicity, from every jsonl file in `folder`."""
    seen: dict[str, float] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for _, row in iter_jsonl(path):
            for part in ("prompt", "continuation"):
                item = row.get(part) or {}
                if item.get("text") and item.get("toxicity") is not None:
                    seen.setdefault(item["text"], float(item["toxicity"]))
    return list(seen), np.array(list(seen.values()))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": lambda s, p: _pearson(rankdata(s), rankdata(p)),
    "pearson": _pearson,
    "roc_auc": lambda s, p: float(roc_auc_score(p >= THRESHOLD, s)),
    "accuracy": lambda s, p: float(np.mean((s >= THRESHOLD) == (p >= THRESHOLD))),
    "precision": lambda s, p: float(precision_score(p >= THRESHOLD, s >= THRESHOLD, zero_division=0)),
    "recall": lambda s, p: float(recall_score(p >= THRESHOLD, s >= THRESHOLD, zero_division=0)),
    "f1": lambda s, p: float(f1_score(p >= THRESHOLD, s >= THRESHOLD, zero_division=0)),
    "kappa": lambda s, p: float(cohen_kappa_score(s >= THRESHOLD, p >= THRESHOLD)),
}


def metrics(scores: np.ndarray, perspective: np.ndarray) -> dict[str, float]:
    return {name: fn(scores, perspective) for name, fn in METRICS.items()}


def with_intervals(
    columns: dict[str, np.ndarray], perspective: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Each column's metrics, with percentile 95% intervals over `n_boot` paired resamples; also the
    paired difference `max - mean` of the two combination rules."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(perspective), len(perspective)) for _ in range(n_boot)]
    boot = {name: [metrics(s[i], perspective[i]) for i in draws] for name, s in columns.items()}
    boot["max - mean"] = [
        {k: a[k] - b[k] for k in a} for a, b in zip(boot["ensemble (max)"], boot["mean of both"])
    ]
    point = {name: metrics(s, perspective) for name, s in columns.items()}
    point["max - mean"] = {k: point["ensemble (max)"][k] - point["mean of both"][k] for k in METRICS}
    return {
        name: {
            k: {
                "value": point[name][k],
                "low": float(np.percentile([b[k] for b in boot[name]], 2.5)),
                "high": float(np.percentile([b[k] for b in boot[name]], 97.5)),
            }
            for k in METRICS
        }
        for name in point
    }


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| scorer | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" for m in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(RTP), help="folder of RealToxicityPrompts jsonl files")
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = check_out_file(args.out)
    texts, perspective = load_rtp(Path(args.data))
    columns: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in ("profanity-check", "bilstm-jigsaw", "ensemble"):
        start = time.perf_counter()
        columns[name] = np.array(get_scorer(name).score(texts))
        seconds[name] = time.perf_counter() - start
    both = np.stack([columns["profanity-check"], columns["bilstm-jigsaw"]])
    columns["ensemble (max)"] = columns.pop("ensemble")
    columns["mean of both"] = both.mean(axis=0)
    assert np.allclose(columns["ensemble (max)"], both.max(axis=0)), "the ensemble is not the max"
    results = with_intervals(columns, perspective, args.bootstrap, args.seed)
    positives = int((perspective >= THRESHOLD).sum())
    toxic = perspective >= THRESHOLD
    caught = {name: columns[name] >= THRESHOLD for name in ("profanity-check", "bilstm-jigsaw")}
    misses = {
        "profanity-check misses, bilstm-jigsaw catches": int(
            (toxic & ~caught["profanity-check"] & caught["bilstm-jigsaw"]).sum()
        ),
        "bilstm-jigsaw misses, profanity-check catches": int(
            (toxic & caught["profanity-check"] & ~caught["bilstm-jigsaw"]).sum()
        ),
        "both miss": int((toxic & ~caught["profanity-check"] & ~caught["bilstm-jigsaw"]).sum()),
    }
    print(f"{len(texts)} texts, {positives} with Perspective >= {THRESHOLD}; {args.bootstrap} resamples")
    print(f"scoring speed: {', '.join(f'{k} {len(texts) / v:.0f} texts/s' for k, v in seconds.items())}")
    print(f"of the {positives} Perspective-toxic texts: " + "; ".join(f"{k} {v}" for k, v in misses.items()))
    print(markdown(results))
    report = {
        "texts": len(texts),
        "positives": positives,
        "threshold": THRESHOLD,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "scoring_seconds": seconds,
        "texts_per_second": {k: len(texts) / v for k, v in seconds.items()},
        "misses": misses,
        "results": results,
    }
    write_atomic(out, json.dumps(report, indent=1))
    print(
        json.dumps({name: {k: round(m["value"], 4) for k, m in row.items()} for name, row in results.items()})
    )


if __name__ == "__main__":
    main()
