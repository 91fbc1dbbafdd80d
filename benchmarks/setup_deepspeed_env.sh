#!/usr/bin/env bash
# Create benchmarks/.venv-deepspeed: a separate environment holding DeepSpeed 0.19.8 for the training benchmark's
# comparison rows. shardwise never imports DeepSpeed; only bench_train.py's DeepSpeed worker runs in this venv.
#
#   bash benchmarks/setup_deepspeed_env.sh            # create (or reuse) the venv
#   PYTHON=python3.11 bash benchmarks/setup_deepspeed_env.sh
#
# DS_BUILD_OPS=0: no C++/CUDA op is compiled at install time (DeepSpeed JIT-builds the few it needs, and the
# benchmark's DeepSpeed configs use torch's Adam so no op is needed at all on CPU).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-deepspeed}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip setuptools wheel >/dev/null
# torch first, so that DeepSpeed's requirement resolves to it (a CPU build where one is available locally).
"$VENV/bin/python" -m pip install "torch==${TORCH_VERSION}"
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install "deepspeed==${DEEPSPEED_VERSION}" psutil numpy
"$VENV/bin/python" - <<'PY'
import deepspeed, torch
print(f"DeepSpeed {deepspeed.__version__} with torch {torch.__version__} ready")
PY
