#!/usr/bin/env bash
# One setup path for a fresh Debian machine (Python 3.11, CPU only, root) and for re-runs:
# apt packages FFCV builds against, a virtual environment, pinned torch/deepspeed/ffcv, bigexp editable.
# Re-running when everything is in place takes seconds (a stamp keyed on the pinned files).
# On a GPU cluster, install into your own environment instead: `pip install -e .` with your CUDA torch.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BIGEXP_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

# ffcv compiles against OpenCV and libjpeg-turbo; Fashion-MNIST is the embedded default data set; tcmalloc is
# the malloc compare.parallel's arm processes preload (bigexp/run/allocator.py).
APT_PKGS=(g++ pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist libtcmalloc-minimal4)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

STAMP="$VENV/.bigexp-setup-stamp"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/constraints/cpu.txt" "$ROOT/launch/setup.sh" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import torch, deepspeed, ffcv" 2>/dev/null; then
  # Same pins: only make sure the editable install points at this checkout (a fresh clone elsewhere).
  where=$("$VENV/bin/python" -c "import bigexp, os; print(os.path.dirname(os.path.dirname(os.path.abspath(bigexp.__file__))))" 2>/dev/null || true)
  if [ "$where" != "$ROOT" ]; then
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
  fi
  echo "[setup] up to date: $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "[setup] installing pinned packages into $VENV (torch is large: a few minutes the first time)"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
"$VENV/bin/pip" install -q -c "$ROOT/constraints/cpu.txt" torch torchvision
"$VENV/bin/pip" install -q -c "$ROOT/constraints/cpu.txt" -e "$ROOT[dev]"
"$VENV/bin/python" -c "import torch, torchvision, deepspeed, ffcv, bigexp" >/dev/null 2>&1 || {
  echo "[setup] import check failed:"; "$VENV/bin/python" -c "import torch, torchvision, deepspeed, ffcv, bigexp"; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] done: $VENV"
