#!/usr/bin/env bash
# The GPU checks of this project in as few device calls as possible.
#
# The lent GPU machine has no network. Its image has Python 3.12 with torch (CUDA), CuPy,
# onnx, onnxruntime, msgpack, psutil and pytest, but not pyzmq or PyAV: their wheels
# travel with the working tree. So:
#
#   here, once (network):  bash perf/gpu_session.sh fetch
#                          -> .gpu-wheels/ (~35 MB, git-ignored; name it in the run's carry)
#   there, one call each:  bash perf/gpu_session.sh tests      # pytest -m gpu
#                          bash perf/gpu_session.sh transport  # perf transport --cuda
#                          bash perf/gpu_session.sh render     # perf render on cuda:0 (+ capacity)
#                          bash perf/gpu_session.sh all        # the three, one after the other
#
# Each step writes its output to $OUT (what the device tool brings back) and to stdout.
# DEVICE (default cuda:0) is the render device; PY the interpreter (default python3).
# The full pipeline (Piper, dlib) is not run there: its wheels and models are ~250 MB,
# past what one call carries; `perf render --upstream test` measures the renderer alone.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # what a step printed survives its being cut at the call's limit
STEP_S=${STEP_S:-140}      # each step's own limit: one that hangs leaves time to the others
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-out/gpu}
WHEELS=.gpu-wheels
mkdir -p "$OUT"

fetch() {
    mkdir -p "$WHEELS"
    pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" pyzmq==27.3.0 av==18.1.0 && ls -la "$WHEELS"  # the versions tested here
}

setup() {
    # pyzmq and PyAV from the carried wheels, unless this Python has them already
    if ! "$PY" -c "import zmq, av" 2>/dev/null; then
        local site=/tmp/giris-gpu-site
        "$PY" -m pip install -q --upgrade --no-index --no-deps --target "$site" "$WHEELS"/*.whl || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$PY" -c "import giris.runtime" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch
from giris.runtime.cuda_pool import cuda_available
import shutil
print("/dev/shm free MiB", shutil.disk_usage("/dev/shm").free >> 20, "(pools need ~192)")
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "| cupy ok:", cuda_available())
EOF
    return 0  # what the device has is reported; the steps say what fails
}

step_tests() {
    # the files with gpu tests only: the others need what the image lacks (Piper, dlib)
    timeout "$STEP_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider $(grep -l "pytest.mark.gpu" tests/*.py) 2>&1 \
        | tee "$OUT/gpu-tests.txt"
}

step_transport() {
    timeout "$STEP_S" "$PY" -m perf transport --cuda --json 2>&1 | tee "$OUT/transport.txt"
}

step_render() {
    timeout "$STEP_S" "$PY" -m perf render --upstream test --device "$DEVICE" --json 2>&1 | tee "$OUT/render.txt"
    timeout "$STEP_S" "$PY" -m perf render --upstream test --device "$DEVICE" --capacity --sizes 512 --json 2>&1 \
        | tee "$OUT/render-capacity.txt"
}

case "${1:-all}" in
    fetch) fetch ;;
    tests) setup && step_tests ;;
    transport) setup && step_transport ;;
    render) setup && step_render ;;
    all) setup && { step_tests; step_transport; step_render; } ;;
    *) echo "usage: $0 fetch|tests|transport|render|all" >&2; exit 2 ;;
esac
