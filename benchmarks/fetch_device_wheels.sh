#!/usr/bin/env bash
# Run where PyPI is reachable: downloads into .whl/ (ignored by git) the wheels a GPU machine with CUDA
# torch and transformers but no network lacks for longred: zarr and its needs (about 10 MB). Carry .whl
# with the repository; benchmarks/device_setup.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
ls -l .whl
