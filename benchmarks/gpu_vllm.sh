#!/usr/bin/env bash
# vLLM-backend precompute throughput on CUDA GPUs with a random-weight Llama-3-8B-shaped teacher (no
# download): tokens/s of the engine's bare prefill and of the vLLM precompute, overhead ratio, MFU.
# Runs in the vLLM environment (benchmarks/vllm_env.sh VENV cuda, where PyPI is reachable; vLLM is too
# large to carry): PYTHON=VENV/bin/python bash benchmarks/gpu_vllm.sh [--tensor-parallel-size 8]
# Writes $OUT/gpu_vllm.json (default benchmarks/results); extra arguments go to gpu_vllm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -c "import vllm" 2>/dev/null || {
    echo "gpu_vllm.sh needs vLLM: bash benchmarks/vllm_env.sh .venv-vllm cuda, then PYTHON=.venv-vllm/bin/python" >&2
    exit 2
}
"$python" -c "import longred.storage" 2>/dev/null || "$python" -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$python" benchmarks/gpu_vllm.py --out "$out/gpu_vllm.json" "$@"
