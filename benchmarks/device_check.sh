#!/usr/bin/env bash
# Every GPU check in one command, for one CUDA GPU (about 22 minutes on an H100): the gpu-marked tests,
# then benchmarks/gpu_precompute.sh, benchmarks/gpu_train.sh and benchmarks/gpu_memory.sh. Results and logs
# go to $OUT (default benchmarks/results); the exit status is non-zero when any part failed (every part still runs).
#   bash benchmarks/fetch_device_wheels.sh          # first, where PyPI is reachable (if zarr is missing there)
#   OUT=/some/dir bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
source benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/device.txt"
status=0
python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) 2>&1 \
    | tee "$OUT/gpu_tests.log" || status=1
bash benchmarks/gpu_precompute.sh 2>&1 | tee "$OUT/gpu_precompute.log" || status=1
bash benchmarks/gpu_train.sh "$OUT" 2>&1 | tee "$OUT/gpu_train.log" || status=1
bash benchmarks/gpu_memory.sh "$OUT" 2>&1 | tee "$OUT/gpu_memory.log" || status=1
exit $status
