#!/usr/bin/env bash
# Precompute throughput on one H100 with a random-weight Llama-3-8B-shaped teacher (no download).
# Needs a CUDA torch and transformers>=5; without network, zarr and its needs travel as wheels in .whl/
# (benchmarks/device_setup.sh). Writes $OUT/gpu_precompute.json (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/gpu_precompute.py --out "$out/gpu_precompute.json"
