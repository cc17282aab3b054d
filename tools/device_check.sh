#!/usr/bin/env bash
# The device check on the GPU machine, from the repository root: its image has jax, flax, optax, chex and
# orbax-checkpoint; the rest comes as wheels from `make gpu-check-prepare`, and the data from .device/data.
# Usage: tools/device_check.sh OUT [extra arguments of tools/device_check.py]
set -euo pipefail
out="${1:?usage: tools/device_check.sh OUT [ARGS...]}"; shift
cd "$(dirname "$0")/.."
if [ ! -d .device/wheels ]; then
  echo "error: .device/wheels is missing: run 'make gpu-check-prepare DATA=...' first and carry .device" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tas-site \
  .device/wheels/*.whl
export PYTHONPATH="/tmp/tas-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TAS_JAX_CACHE="${TAS_JAX_CACHE:-/tmp/tas-cache}"
data=$(ls .device/data/* 2>/dev/null | head -1 || true)
exec python3 tools/device_check.py --mode full --out "$out" ${data:+--data "$data"} "$@"
