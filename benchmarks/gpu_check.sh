#!/usr/bin/env bash
# The GPU check's entry point (make gpu-check): benchmarks/gpu_check.py with this checkout's src/ on
# the path. On the GPU machine, whose image has torch and transformers but not DeepSpeed or pydantic,
# the wheels carried in .whl/ (see docs/benchmarks.md) are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT [gpu_check.py options, e.g. --dry-run]}
shift
PY=${PYTHON:-python3}
# find_spec looks DeepSpeed up without importing it (an import is seconds of the device's time)
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" 2>/dev/null \
    && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
