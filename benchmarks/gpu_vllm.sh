#!/usr/bin/env bash
# vLLM-backend precompute throughput on CUDA GPUs with a random-weight Llama-3-8B-shaped teacher (no
# download): tokens/s of the engine's bare prefill and of the vLLM precompute, overhead ratio, MFU.
# Needs vLLM's CUDA build installed on the machine (pip install "longred[vllm]"; too large to carry).
# Writes $OUT/gpu_vllm.json (default benchmarks/results). Extra arguments go to gpu_vllm.py
# (e.g. --tensor-parallel-size 8).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
source benchmarks/device_setup.sh
python3 -c "import vllm" 2>/dev/null || {
    echo "gpu_vllm.sh needs vLLM (CUDA build): pip install \"longred[vllm]\"" >&2
    exit 2
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/gpu_vllm.py --out "$out/gpu_vllm.json" "$@"
