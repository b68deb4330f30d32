#!/usr/bin/env bash
# Precompute throughput on one H100 with a random-weight Llama-3-8B-shaped teacher (no download).
# Needs a CUDA torch and transformers>=5. Missing packages (zarr, numcodecs, ...) may be carried as wheels
# in .whl/ (see README); the project itself is built into /tmp/site. Writes $OUT/gpu_precompute.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/gpu_precompute.py --out "$out/gpu_precompute.json"
