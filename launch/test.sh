#!/usr/bin/env bash
# README command (2): set up, then run the whole test suite (slow multi-process tests included).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup.sh"
VENV=${BIGEXP_VENV:-$ROOT/.venv}
cd "$ROOT"
# torchrun children import bigexp from this checkout, not from whichever clone was installed last.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The venv first on PATH for every child: torch builds DeepSpeed's CPU op with whichever `ninja` comes first, and the
# venv's (1.13) and Debian's (1.11) disagree about whether that build is current, so mixed PATHs rebuild it each time.
export PATH="$VENV/bin:$PATH"
# DeepSpeed ops a test's own script builds (the drop-in examples call deepspeed.initialize themselves) go to this venv's
# directory: a build log written by another clone's venv names that venv's paths, and torch would rebuild on each switch.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
# Two workers, whole files each (--dist loadfile: a file's module fixtures - one SLURM cluster, one set of network
# namespaces - stay in one process). Many tests wait rather than compute (SLURM requeues, torchrun start-up,
# DeepSpeed imports), so two workers keep both cores busy; `-n 0` after these runs everything in one process.
exec "$VENV/bin/python" -m pytest -n "${BIGEXP_TEST_WORKERS:-2}" --dist loadfile "$@"
