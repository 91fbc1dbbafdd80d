#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels the GPU machine lacks into .whl/ (git-ignored), built for
# that machine's Python 3.12 on x86-64 (see docs/gpu.md). benchmarks/gpu_check.sh installs them there from the
# carried folder; the device run must name it: carry [".whl"].
#
#   bash benchmarks/gpu_fetch_wheels.sh            # PYTHON=/path/to/python to choose the pip that downloads
#
# The machine's image has torch 2.11 + CUDA 13, numpy, safetensors, psutil, transformers and pytest; of shardwise's
# runtime dependencies it lacks pydantic (and pydantic's own: pydantic-core, annotated-types, typing-inspection;
# typing-extensions travels too, since pydantic needs a recent one). Versions: the ones this project's venv runs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
WHEELS=(
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install on the machine
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEST")
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download -q "${args[@]}" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
