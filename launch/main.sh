#!/usr/bin/env bash
# README command (1): set up, then the main job on the embedded default data (Fashion-MNIST):
# write the .beton files, train the step-decay baseline and its exp-LR twin, leave TensorBoard logs and plots.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
VENV=${BIGEXP_VENV:-$ROOT/.venv}
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/bigexp" compare --config configs/fmnist/main.yaml "$@"
