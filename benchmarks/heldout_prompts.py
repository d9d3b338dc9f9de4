"""Write held-out RealToxicityPrompts prompts: never used to calibrate or tune anything here.

The first --n toxic (toxic_1k) and --n non-toxic (nontoxic_1k) prompts of the DeStein authors'
rescored subsets that are not in test_100 (the calibration set), in file order. Reads
../shared/data by path and writes only --out (nothing is copied into the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from destein_lens.readers import iter_jsonl

RTP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25, help="prompts from each of toxic_1k and nontoxic_1k")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    calibration = {row["prompt"]["text"] for _, row in iter_jsonl(RTP / "test_100.jsonl")}
    lines = []
    for name in ("toxic_1k.jsonl", "nontoxic_1k.jsonl"):
        rows = (line for line in (RTP / name).read_text(encoding="utf-8").splitlines() if line.strip())
        kept = [line for line in rows if json.loads(line)["prompt"]["text"] not in calibration]
        lines += kept[: args.n]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} held-out prompts to {args.out}")


if __name__ == "__main__":
    main()
