"""Cold versus warm load of the default model (`destein_lens.load_model()`, gemma-3-270m GGUF).

The first load in an empty cache assembles the GGUF file from its package, dequantises it and
writes a safetensors copy under `$DESTEIN_LENS_CACHE`; later loads read that copy. This measures
how much the cache saves: one cold load into a fresh temporary cache folder, then several warm
loads from the same folder. Every load runs in its own fresh Python subprocess, so no import or
process-wide state leaks from one load to the next; the `load_model()` call is timed inside the
subprocess (reported as the figure compared), and the subprocess wall time (interpreter start,
imports and load) is reported beside it. Warm figures are medians.

The machine may be shared, so the ratio warm / cold is what to read, not the absolute seconds.
The last line printed is one JSON object with the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
import destein_lens
t1 = time.perf_counter()
model = destein_lens.load_model(device="cpu")
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}), flush=True)
"""


def run_load(cache: Path, threads: int) -> dict[str, float]:
    """One `load_model()` in a fresh subprocess with `DESTEIN_LENS_CACHE=cache`."""
    env = dict(os.environ, DESTEIN_LENS_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"load subprocess failed with exit status {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warm", type=int, default=3, help="number of warm loads (median taken; default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess (default 2)")
    parser.add_argument(
        "--target", type=float, default=0.15, help="pass if warm / cold <= this (default 0.15)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache folder")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="destein-bench-load-"))
    try:
        cold = run_load(cache, args.threads)
        print(
            f"cold: load_model {cold['load_s']:.2f} s  (imports {cold['import_s']:.2f} s, "
            f"subprocess wall {cold['wall_s']:.2f} s)",
            flush=True,
        )
        warm_runs = []
        for i in range(args.warm):
            w = run_load(cache, args.threads)
            warm_runs.append(w)
            print(
                f"warm {i + 1}: load_model {w['load_s']:.2f} s  (imports {w['import_s']:.2f} s, "
                f"subprocess wall {w['wall_s']:.2f} s)",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"cache kept at {cache}")
        else:
            shutil.rmtree(cache, ignore_errors=True)

    warm = statistics.median(w["load_s"] for w in warm_runs)
    warm_wall = statistics.median(w["wall_s"] for w in warm_runs)
    ratio = warm / cold["load_s"]
    passed = ratio <= args.target
    print(
        f"load_model: cold {cold['load_s']:.2f} s, warm {warm:.2f} s (median of {len(warm_runs)}), "
        f"warm/cold {ratio:.3f} (target <= {args.target}): {'PASS' if passed else 'FAIL'}; "
        f"subprocess wall: cold {cold['wall_s']:.2f} s, warm {warm_wall:.2f} s "
        f"({warm_wall / cold['wall_s']:.3f})"
    )
    print(
        json.dumps(
            {
                "bench": "load",
                "cold_s": round(cold["load_s"], 3),
                "warm_s": round(warm, 3),
                "warm_over_cold": round(ratio, 4),
                "cold_wall_s": round(cold["wall_s"], 3),
                "warm_wall_s": round(warm_wall, 3),
                "warm_runs_s": [round(w["load_s"], 3) for w in warm_runs],
                "target": args.target,
                "pass": passed,
            }
        )
    )


if __name__ == "__main__":
    main()
