#!/usr/bin/env bash
# The GPU checks of issues 13 and 16, in one call of the device machine (an H200 here; see docs/performance.md).
#
#   benchmarks/gpu/run.sh kit      # here: copy SmolLM2's config and tokenizer into .devkit/ (ignored, carried)
#   benchmarks/gpu/run.sh device   # there, with $OUT set: everything below, packed into $OUT/gpu.tar.gz
#
# The device machine has its own python3 (torch, transformers, peft, accelerate; no trl, datasets or gguf),
# and the 540 MB checkpoint cannot travel, so the bench runs on a randomly initialised model of
# SmolLM2-135M's architecture (benchmarks/gpu/random_model.py): the cost of a step depends on the shapes.
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
kit)
    src=$(HF_HUB_OFFLINE=1 .venv/bin/python -c "from drpost.models import smollm2_path; print(smollm2_path())")
    mkdir -p .devkit/smollm2
    cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .devkit/smollm2/
    grep -qx "/.devkit/" .git/info/exclude 2>/dev/null || echo "/.devkit/" >> .git/info/exclude
    du -sh .devkit ;;
device)
    : "${OUT:?set OUT}"
    export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export DRPOST_CALIBRATION_CACHE=/tmp/drpost-calibration.json
    res=/tmp/gpu-results; mkdir -p "$res"
    exec > >(tee "$res/log.txt") 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    python3 benchmarks/gpu/random_model.py .devkit/smollm2 /tmp/smol || exit 1
    # 1. issue 13: DrPostTrainer under accelerate's FSDP2 plugin (one rank), checkpoint and resume
    a=benchmarks/gpu/accelerate_fsdp2.py
    timeout 60 python3 $a --out /tmp/af/ref &&
    timeout 60 torchrun --nproc_per_node 1 $a --out /tmp/af/fsdp --fsdp &&
    timeout 60 torchrun --nproc_per_node 1 $a --out /tmp/af/resumed --fsdp --resume /tmp/af/fsdp/checkpoint-2 &&
    python3 $a --compare /tmp/af/ref /tmp/af/fsdp /tmp/af/resumed | tee "$res/accelerate_fsdp2.txt"
    tar -czf "$OUT/gpu.tar.gz" -C /tmp gpu-results      # after every part: a run cut off still returns the rest
    # 2. issue 16: the bench, bf16 autocast and fp32, T = 512 and 2048, activation checkpointing off / on
    configs=layerwise:auto,layerwise:pairwise_ghost,layerwise:sketch,global:auto,global:auto:recompute,filter:auto
    for spec in "bf16 512" "bf16 2048" "bf16 512 --gradient-checkpointing" "bf16 2048 --gradient-checkpointing" \
                "fp32 512" "fp32 2048"; do
        set -- $spec
        echo "=== bench $spec"
        timeout 100 python3 -m drpost.cli bench --model /tmp/smol --device cuda --dtype "$1" --seq "$2" ${3:-} \
            --configs "$configs" --no-naive --reps 10 --warmup 2 --no-progress --out "$res/bench" | tail -n 40
        tar -czf "$OUT/gpu.tar.gz" -C /tmp gpu-results
    done ;;
*)
    echo "usage: $0 kit|device" >&2; exit 2 ;;
esac
