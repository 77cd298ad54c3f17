#!/usr/bin/env bash
# GPU benchmark for one fresh single-GPU machine, under 5 minutes once packages are in place:
#   ResNet-50 bf16 channels-last images/s, bigexp's step (DeepSpeed + ExpSGD) vs plain PyTorch, peak memory,
#   and the FFCV loader's images/s on ../shared/data/imagenet-sample.
#
#   bash bench/gpu.sh [args for bench/gpu.py, e.g. --batch 256]
#
# What it needs and gets (each step skipped when already satisfied):
#   apt:  the libraries ffcv compiles against (libturbojpeg, OpenCV, pkg-config, a C++ compiler)
#   pip:  deepspeed, ffcv, numba, ... pinned as in constraints/cpu.txt, into a venv that sees the machine's own
#         CUDA torch (--system-site-packages); torch itself is installed only if there is none.
# The JSON result goes to stdout and to bench/out/gpu.json; progress to stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV=${BIGEXP_GPU_VENV:-$ROOT/bench/out/venv-gpu}   # bench/out/ is gitignored
DATA=${BIGEXP_IMAGENET_SAMPLE:-$ROOT/../shared/data/imagenet-sample/val}
LIMIT_S=${BIGEXP_GPU_BENCH_LIMIT_S:-270}   # the python part's wall-clock limit
say() { echo "[gpu.sh $(date +%H:%M:%S) +${SECONDS}s] $*" >&2; }

# --- the machine
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
else
  say "warning: nvidia-smi not found; gpu.py will stop if torch sees no CUDA device"
fi
if [ ! -d "$DATA" ]; then
  say "error: $DATA not found (ImageNet sample, <wnid>/*.JPEG); set BIGEXP_IMAGENET_SAMPLE"
  exit 2
fi

# --- apt: ffcv's native dependencies (only when ffcv is not importable yet)
need_ffcv_build() { ! "$1" -c "import ffcv.libffcv" >/dev/null 2>&1; }
if need_ffcv_build "$PY" && { [ ! -x "$VENV/bin/python" ] || need_ffcv_build "$VENV/bin/python"; }; then
  missing=()
  for p in g++ pkg-config libturbojpeg0-dev libopencv-dev; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    say "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
fi

# --- python environment: a venv over the system site-packages (keeps the CUDA torch, avoids PEP 668)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (system site-packages visible)"
  if ! "$PY" -m venv --system-site-packages "$VENV" >&2; then
    say "python venv unavailable; installing into $PY's environment instead"
    VENV=""
  fi
fi
if [ -n "$VENV" ]; then PYV="$VENV/bin/python"; else PYV="$PY"; fi
PIP=("$PYV" -m pip install -q)
if [ -z "$VENV" ] && "$PY" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
  PIP+=(--break-system-packages)
fi

pin() {  # the version constraints/cpu.txt pins, as NAME==VERSION (NAME alone when unpinned)
  local v
  v=$(grep -i -E "^$1==" "$ROOT/constraints/cpu.txt" | head -1 | cut -d= -f3 || true)
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

if ! "$PYV" -c "import torch, torchvision" >/dev/null 2>&1; then
  say "no torch here: pip install torch torchvision (the default index serves CUDA builds on Linux)"
  "${PIP[@]}" torch torchvision >&2
fi
"$PYV" -c "import torch; print('[gpu.sh] torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" >&2

want=()
"$PYV" -c "import deepspeed" >/dev/null 2>&1 || want+=("$(pin deepspeed)")
"$PYV" -c "import numba" >/dev/null 2>&1 || want+=("$(pin numba)")
"$PYV" -c "import ffcv.libffcv" >/dev/null 2>&1 || want+=("$(pin ffcv)" "$(pin opencv-python)")
for m in yaml:PyYAML tqdm:tqdm tensorboard:tensorboard matplotlib:matplotlib PIL:pillow; do
  "$PYV" -c "import ${m%%:*}" >/dev/null 2>&1 || want+=("$(pin "${m##*:}")")
done
if [ ${#want[@]} -gt 0 ]; then
  say "pip install ${want[*]}"
  # deepspeed and ffcv build against the torch/numpy already present: no build isolation, torch untouched
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "${want[@]}" >&2 || DS_BUILD_OPS=0 "${PIP[@]}" "${want[@]}" >&2
fi
# bigexp itself from this checkout (no dependency resolution: torch stays as it is)
"$PYV" -c "import bigexp" >/dev/null 2>&1 || "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" >&2 || true
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say "environment ready"

# --- the benchmark (hard wall-clock limit; its JSON still arrives if one section failed)
mkdir -p "$ROOT/bench/out"
rc=0
timeout --kill-after=10 "$LIMIT_S" "$PYV" "$ROOT/bench/gpu.py" --source "$DATA" --json "$ROOT/bench/out/gpu.json" "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  say "error: bench/gpu.py ran past ${LIMIT_S}s (lower --steps/--rounds/--epochs)"
fi
say "done (rc $rc); JSON also in bench/out/gpu.json"
exit "$rc"
