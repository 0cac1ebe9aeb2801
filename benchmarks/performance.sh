#!/usr/bin/env bash
# Regenerate the measurements of docs/performance.md (CPU; ~75 min on a quiet 2-core machine).
#   ./run.sh --help >/dev/null && bash benchmarks/performance.sh [OUT_DIR]
# Every table is one `drpost bench` run: plain and drpost steps alternated in one process,
# 1 warm-up + 5 timed steps per variant, medians, ratios to the plain step; peak RSS of one step
# measured in a fresh process per variant (after a warm-up step).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-docs/performance}"
export HF_HUB_OFFLINE=1
DRPOST=.venv/bin/drpost
MAIN=layerwise:auto,layerwise:sketch,global:auto,layerwise:pairwise_ghost
# (B, T, V) = (8, 128, 1): the targets' configurations, pairwise, and the naive alternatives, fp32 and bf16
$DRPOST bench --seq 128 --dtype fp32 --configs $MAIN --out "$OUT" --no-progress
$DRPOST bench --seq 128 --dtype bf16 --configs $MAIN --out "$OUT" --no-progress
# (8, 512, 1): the targets' configurations
$DRPOST bench --seq 512 --dtype bf16 --no-naive --configs layerwise:auto,layerwise:sketch,global:auto --out "$OUT" --no-progress
$DRPOST bench --seq 512 --dtype fp32 --no-naive --configs layerwise:auto,layerwise:sketch,global:auto --out "$OUT" --no-progress
# separate target strategy: the target gradient captured every 4 steps instead of a target row in every step
$DRPOST bench --seq 128 --dtype fp32 --no-naive --configs layerwise:auto,layerwise:sketch,global:auto \
    --target-strategy separate --refresh-every 4 --reps 8 --memory off --out "$OUT" --no-progress
# ratio vs T and vs V
.venv/bin/python benchmarks/bench_scaling.py --dtype bf16 --configs layerwise:auto,layerwise:sketch \
    --seqs 64,128,256,512 --targets 1,2,4,8 --out "$OUT"
# the collectives' cost: 2 processes (gloo), distributed drpost vs a plain DDP step
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_distributed.py --out "$OUT"
# MeSO optimizer-state memory on the embedded model
.venv/bin/python benchmarks/meso_memory.py --out "$OUT"
