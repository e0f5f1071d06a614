#!/usr/bin/env bash
# GPU check, one H100/H200, under 8 minutes (each step has a hard timeout; the three add up to 7 minutes):
#   1. scripts/benchmark.py, W=1, bf16, a ~1.1B-parameter shape (L=16, d=2048, FFN 8192, 16 heads, 8 KV heads,
#      n=8, V=32000), prefill of 1024 tokens and 64 new tokens: every variant, eager, dynamic cache;
#   2. the same with the static cache + torch.compile (mode "reduce-overhead": CUDA graphs) for PT D=8 and the Llama;
#   3. scripts/project_multi_gpu.py: per-layer compute of the paper's 30B shape measured on this GPU, projected to 8.
# Writes JSON (and .md/.png) per step into OUT_DIR. Exits non-zero if any step fails, in particular if PT's outputs
# disagree with the reference: PT in tensor-parallel layout vs transformers' Llama with the same weights, and every
# compiled variant vs its eager self (the benchmark exits 1 on a mismatch).
#
#   bash scripts/gpu_check.sh [OUT_DIR]                 default OUT_DIR: gpu-check-results
#   bash scripts/gpu_check.sh --cpu-dry-run [OUT_DIR]   the same steps on a tiny model on the CPU, in float32
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    shift
    RUN=(--device cpu --dtype float32 --quick)
    PROJECT=(--device cpu --dtype float32 --prompt-len 16 --warmup 0 --repeats 1 --decode-steps 2)
    LIMITS=(300 600 120)  # CPU compilation of C++ kernels on a busy machine
else
    RUN=(--device cuda --dtype bfloat16 --layers 16 --hidden-size 2048 --intermediate-size 8192 --heads 16
         --kv-heads 8 --num-tracks 8 --vocab-size 32000 --batch 1 --prompt-len 1024 --new-tokens 64
         --warmup 2 --repeats 5)
    PROJECT=(--device cuda --dtype bfloat16)
    LIMITS=(120 240 60)
fi
OUT=${1:-gpu-check-results}
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1
# the scripts import the model code from the installed package, as every script does
if ! "$PYTHON" -c "import modeling_ptt" 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import modeling_ptt; install it first, offline:" \
         "$PYTHON -m pip install --no-deps --no-build-isolation -e ." >&2
    exit 2
fi
mkdir -p "$OUT"

{
    date -u
    git describe --always --dirty 2>/dev/null || true
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

echo "== 1/3 eager, dynamic cache, all variants"
timeout "${LIMITS[0]}" "$PYTHON" scripts/benchmark.py "${RUN[@]}" --throughput-batch 16 --out "$OUT/w1_eager"

echo "== 2/3 static cache + torch.compile"
timeout "${LIMITS[1]}" "$PYTHON" scripts/benchmark.py "${RUN[@]}" --cache static --compile \
    --variants pt_D8 transformers_llama --throughput-batch 0 --out "$OUT/w1_compiled"

echo "== 3/3 projection to 8 GPUs from this device's per-layer compute"
timeout "${LIMITS[2]}" "$PYTHON" scripts/project_multi_gpu.py "${PROJECT[@]}" --json "$OUT/projection.json" \
    | tee "$OUT/projection.txt"

echo "gpu check passed: $OUT"
