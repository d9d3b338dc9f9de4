#!/usr/bin/env bash
# On a machine with a GPU: the real-model tests on CUDA, bench_generation and bench_roofline on the
# GPU, and a 2-rank torchrun run when two or more GPUs are visible. Results go to $OUT (default
# gpu_results/). Set up first with `bash scripts/setup.sh` after installing a CUDA torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count())" \
  | tee "$OUT/torch.txt"
DESTEIN_LENS_TEST_DEVICE=cuda "$PY" -m pytest -q -m real -p no:cacheprovider 2>&1 | tail -40 >"$OUT/tests_real_cuda.txt"
"$PY" benchmarks/bench_generation.py --device cuda --batch 32 --rounds 3 --greedy-rounds 1 \
  >"$OUT/bench_generation.txt" 2>&1
"$PY" benchmarks/bench_roofline.py --decode --device cuda --threads 1 --batch-sizes 8 32 128 512 \
  >"$OUT/bench_roofline.txt" 2>&1
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m destein_lens run --out "$OUT/run_2gpu" \
    >"$OUT/torchrun.txt" 2>&1
  "$PY" -m destein_lens run --out "$OUT/run_1gpu" >"$OUT/single.txt" 2>&1
  "$PY" - "$OUT" <<'PY' >"$OUT/torchrun_compare.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for method in ("baseline", "destein"):
    a, b = ((out / d / f"prompted_gens_{method}.jsonl").read_text().splitlines() for d in ("run_2gpu", "run_1gpu"))
    same = [json.loads(x)["generations"][0]["text"] == json.loads(y)["generations"][0]["text"] for x, y in zip(a, b)]
    print(method, f"{sum(same)}/{len(same)} prompts with identical first samples")
PY
fi
tail -n 3 "$OUT"/*.txt
