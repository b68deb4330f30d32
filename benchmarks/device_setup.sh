# Sourced by the GPU scripts (bash benchmarks/gpu_*.sh) from the repository root. On a GPU machine without
# network access it installs the wheels carried in .whl/ (benchmarks/fetch_device_wheels.sh fetches them
# where PyPI is reachable) and this project (editable, no dependencies); where `longred.storage` already
# imports (pip install -e . done), it does nothing.
if ! python3 -c "import longred.storage" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
        echo "pip could not install longred (editable, no build isolation: needs setuptools>=64 and wheel)" >&2
        exit 1
    }
    python3 -c "import longred.storage, zarr, numcodecs" || {
        echo "longred does not import: carry zarr and its needs (bash benchmarks/fetch_device_wheels.sh)" >&2
        exit 1
    }
fi
