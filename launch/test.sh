#!/usr/bin/env bash
# README command (2): set up, then run the whole test suite (slow multi-process tests included).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
VENV=${BIGEXP_VENV:-$ROOT/.venv}
cd "$ROOT"
# torchrun children import bigexp from this checkout, not from whichever clone was installed last.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest "$@"
