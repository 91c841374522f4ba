#!/usr/bin/env bash
# What the GPU machine's image lacks, prepared here so that its short slot goes to measuring
# (make gpu-carry; docs/benchmarks.md): .whl/ holds DeepSpeed, pydantic and what it needs, hjson and
# liger-kernel as wheels for the device's Python (cp312 manylinux, versions from constraints.txt),
# which benchmarks/gpu_check.sh installs there; .gpu-assets/ holds the demo's tiny tokenizer, model
# and data under the device Python's cache key, so the check does not spend the slot building them.
# The device call then carries both: run(carry=[".whl", ".gpu-assets"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE_PY=${DEVICE_PY:-3.12}
LIGER=liger-kernel==0.8.5  # the release the GPU runs were measured with; not a runtime dependency

pin() {  # NAME==VERSION of a package as constraints.txt pins it
    local line
    line=$(grep -i -E "^$1==" constraints.txt | head -1)
    [[ -n $line ]] || { echo "gpu_carry: $1 is not pinned in constraints.txt" >&2; exit 1; }
    echo "$line"
}

rm -rf .whl.tmp && mkdir .whl.tmp
"$PY" -m pip wheel -q --no-deps -w .whl.tmp "$(pin deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl.tmp \
    "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
    "$(pin typing-inspection)" "$LIGER"
rm -rf .whl && mv .whl.tmp .whl

# The assets are plain files; only their cache key names the Python version that built them.
key="v1-py${DEVICE_PY/./}"
"$PY" - "$key" <<'PY'
import os, shutil, sys, tempfile
from pathlib import Path

from fulltune.demo.assets import build_demo_assets

# the tests' cache when there is one (building the assets pre-trains the tiny model: ~2 minutes)
cache = os.environ.get("FULLTUNE_TEST_ASSETS") or Path(tempfile.gettempdir()) / "fulltune-gpu-carry-assets"
source = build_demo_assets(Path(cache)).root
target = Path(".gpu-assets") / sys.argv[1]
shutil.rmtree(".gpu-assets", ignore_errors=True)
shutil.copytree(source, target)
print(f"gpu_carry: {target} from {source}")
PY
du -sh .whl .gpu-assets
