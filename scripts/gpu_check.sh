#!/usr/bin/env bash
# One GPU, under 8 minutes: ViT-B-16 (random init, nothing downloaded) with --precision amp_bf16, B = 128.
#   bash scripts/gpu_check.sh OUT.json        (needs scripts/setup.sh's .venv, or PY=/path/to/python)
# 1. the AMP precision check (AVL/PVL under bf16 autocast vs fp32, --diff-precision fp32 vs autocast) and
#    what --diff-precision fp32 costs: scripts/bench_arms.py, arms interleaved in one process
# 2. the step benchmark at B' = B and B/4 for flyp, dive, dive-cached, dive-separate, interleaved in one
#    process: paired ratios to FLYP (median, min..max over rounds), peak torch.cuda.max_memory_allocated
#    (one child per arm), reference data wait
# Writes OUT.json (the summary) and OUT.d/ (each script's own output). Time limits: 100 s + 360 s.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT.json}
DIR=${OUT%.json}.d
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
timeout 100 "$PY" scripts/bench_arms.py --model ViT-B-16 --precision amp_bf16 --batch-size 128 \
    --ref-ratios 1,0.25 --steps 10 --warmup 3 --out "$DIR/arms.json"
timeout 360 "$PY" scripts/benchmark_step.py --model ViT-B-16 --precision amp_bf16 --batch-size 128 \
    --ref-ratios 1,0.25 --rounds 4 --steps 12 --warmup 2 --memory-steps 2 \
    --variants flyp,dive,dive-cached,dive-separate --workers 4 --ref-workers 4 --out "$DIR/bench"
"$PY" - "$OUT" "$DIR" <<'PY'
import json, sys
out, d = sys.argv[1], sys.argv[2]
arms, bench = json.load(open(f"{d}/arms.json")), json.load(open(f"{d}/bench/benchmark.json"))
summary = {"device": bench["device"], "precision": "amp_bf16", "model": "ViT-B-16", "batch_size": 128,
           "precision_check": arms["precision_check"], "diff_precision_cost": arms["rows"],
           "benchmark_command": bench["command"], "benchmark_rows": bench["rows"], "goals": bench["goals"]}
json.dump(summary, open(out, "w"), indent=1)
print(open(f"{d}/bench/benchmark.md").read())
print(f"gpu_check: wrote {out}")
PY
