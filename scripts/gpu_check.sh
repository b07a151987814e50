#!/usr/bin/env bash
# One GPU, under 8 minutes: ViT-B-16 (random init, nothing downloaded) with --precision amp_bf16.
#   bash scripts/gpu_check.sh [OUT]        (default OUT: runs/gpu_check; needs scripts/setup.sh's .venv)
# 1. the AMP precision check and the cost of --diff-precision fp32 (interleaved arms, one process):
#    OUT/arms.json
# 2. upstream's step through the plugin at B' = B and B/4: ratios to FLYP, peak
#    torch.cuda.max_memory_allocated, reference data wait: OUT/bench/benchmark.json and .md
# Summary: OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
timeout 150 "$PY" scripts/bench_arms.py --model ViT-B-16 --precision amp_bf16 --batch-size 128 \
    --ref-ratios 1,0.25 --steps 10 --warmup 3 --out "$OUT/arms.json"
timeout 300 "$PY" scripts/benchmark_step.py --model ViT-B-16 --precision amp_bf16 --batch-size 128 \
    --ref-ratios 1,0.25 --steps 10 --warmup 3 --variants flyp,dive,dive-cached --workers 4 --ref-workers 4 \
    --concat-steps 0 --out "$OUT/bench"
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
arms, bench = json.load(open(f"{out}/arms.json")), json.load(open(f"{out}/bench/benchmark.json"))
summary = {"device": bench["device"], "precision_check": arms["precision_check"], "arms": arms["rows"],
           "benchmark_rows": bench["rows"], "goals": bench["goals"]}
json.dump(summary, open(f"{out}/gpu_check.json", "w"), indent=1)
print(f"gpu_check: wrote {out}/gpu_check.json")
PY
