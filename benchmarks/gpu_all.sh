#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one go, under 8 minutes on one H100: the training step (R101 and
# R50 at crop 321, batch 2 as the seed runs it), evaluation (Cityscapes' sliding windows at 1024x2048,
# crop 513; Pascal-sized whole images), the data pipeline on the host's CPU, and the fast path's
# accuracy on the GPU. Each piece has its own time limit, so one slow piece cannot eat the others'.
#
#   OUT=/some/folder benchmarks/gpu_all.sh     # default OUT: benchmarks/results/gpu
#
# Multi-GPU scaling (benchmarks/scaling.py --gpu --workers 1,N) needs more than one GPU: run it apart.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
OUT=${OUT:-benchmarks/results/gpu}
export PYTHONPATH="$PWD:$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
started=$(date +%s)

run() {  # run NAME SECONDS SCRIPT ARGS...: stdout -> $OUT/NAME.md, stderr -> $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PY" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log"
    echo "$name: exit $? after $(($(date +%s) - started)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
run train_step_gpu 150 benchmarks/train_step.py --backbones resnet101:321,resnet50:321 \
    --batch 2 --steps 6 --reps 3 --warmup 3
run evaluation_gpu 120 benchmarks/evaluation.py --backbone resnet101 --crop 513 \
    --window-image 1024x2048 --whole-image 500x500 --images 4 --reps 3
run data_pipeline_host 60 benchmarks/data_pipeline.py --reps 3
run accuracy_gpu 150 benchmarks/train_step.py --accuracy --seeds 0,1,2 --epochs 8 --out /tmp/bench-accuracy
echo "all done in $(($(date +%s) - started)) s; results in $OUT"
