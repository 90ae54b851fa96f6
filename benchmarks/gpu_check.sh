#!/usr/bin/env bash
# The device command of benchmarks/gpu_check.py (see its docstring): installs the carried
# wheels (.whl, from benchmarks/device_wheels.sh) for the device's Python, then runs the checks
# and timings into $OUT. Extra arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
if ! python3 -c "import anndata" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi 2>&1 | head -15 | tee "$out/nvidia-smi.txt"
python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
