#!/usr/bin/env bash
# GPU validation for one fresh single-GPU machine (issue "correct wherever it runs"), under 8 minutes:
#   bash bench/gpu_validate.sh            # after (or instead of) bench/gpu.sh, which it reuses for the install
# Each check prints one line `[validate] NAME: ok|FAIL ...`; the exit status is the number of failed checks.
#   doctor        bigexp doctor on the GPU (versions, NCCL, numeric self-checks in bf16_autocast, channels-last)
#   bf16 / fp16 / bf16_autocast
#                 1-GPU NCCL runs of the exp-LR arm with renormalisation every 3 steps, a checkpoint and an eval,
#                 with BIGEXP_CHECK_DEVICE=1 (every collective's tensor must be on the GPU)
#                 (the BN-statistics rescale at each renormalisation must reach the live GPU buffers, not CPU copies
#                 taken before .to(): the eval after it would be off by c)
#   two-ranks-one-gpu
#                 2 ranks sharing the GPU through the cpu:gloo,cuda:nccl group with the device check on
#   resnet50      bench/gpu.sh's ResNet-50 img/s (bigexp step vs plain PyTorch), peak memory, FFCV loader on the GPU
#   optimizer-resnet50
#                 bench/optimizer.py on the GPU: ExpSGD / torch SGD step time on ResNet-50's params, foreach and fused
#                 kernels (JSON: $OUT/optimizer.json)
#   compile-resnet50
#                 bench/compile.py on the GPU: the bigexp step (bf16_autocast, channels-last) of ResNet-50 at 224 px,
#                 eager vs engine.compile (inductor), the exp-LR arm: compile time and compiled/eager step-time ratio
#                 (JSON: $OUT/compile.json; capped at COMPILE_LIMIT_S, last, so it cannot starve the checks above)
# Written and checked on CPU only (no GPU was lent to the session that wrote it): the first GPU run is its test.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LIMIT_S=${BIGEXP_GPU_VALIDATE_LIMIT_S:-470}   # under 8 minutes in all
COMPILE_LIMIT_S=${BIGEXP_GPU_COMPILE_LIMIT_S:-150}
export BIGEXP_GPU_BENCH_LIMIT_S=${BIGEXP_GPU_BENCH_LIMIT_S:-150}
OUT=${OUT:-$ROOT/bench/out}/validate
mkdir -p "$OUT"
fails=0
say() { echo "[validate $(date +%H:%M:%S) +${SECONDS}s] $*" >&2; }
check() {  # check NAME CMD...: run with the remaining time as its limit, record ok/FAIL
  local name=$1; shift
  local left=$(( LIMIT_S - SECONDS )); [ "$left" -lt 20 ] && { echo "[validate] $name: SKIPPED (time)"; fails=$((fails+1)); return; }
  if timeout --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1; then echo "[validate] $name: ok"
  else echo "[validate] $name: FAIL (rc $?, log $OUT/$name.log)"; tail -5 "$OUT/$name.log"; fails=$((fails+1)); fi
}

# the environment bench/gpu.sh builds (apt for ffcv, a venv over the machine's CUDA torch, bigexp editable)
check resnet50 bash bench/gpu.sh --steps 5 --rounds 2 --epochs 1
PY=${BIGEXP_GPU_VENV:-$ROOT/bench/out/venv-gpu}/bin/python
[ -x "$PY" ] || PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" BIGEXP_CHECK_DEVICE=1
DATA="$OUT/data"
TINY=(run.device=cuda run.progress=false log.plots=false run.epochs=4 run.max_steps=12 run.checkpoint_every_steps=6
      data.batch_size=64 data.train_beton="$DATA/fmnist_train.beton" data.val_beton="$DATA/fmnist_test.beton" data.write_missing=false
      optim.optimizer=expsgd optim.renorm_every=3 model.width=16)
check fmnist-data "$PY" -m bigexp data fmnist /usr/share/datasets/fashion-mnist "$DATA" --limit 2048 --no-progress
check doctor "$PY" -m bigexp doctor --config configs/imagenet/rn50_step_exp.yaml run.device=cuda
for prec in bf16_autocast bf16 fp16; do
  check "$prec" "$PY" -m bigexp train --config configs/fmnist/main.yaml run.out_dir="$OUT/runs" run.name="$prec" \
    engine.precision="$prec" "${TINY[@]}"
done
check two-ranks-one-gpu "$PY" -m torch.distributed.run --nproc_per_node 2 -m bigexp train --config configs/fmnist/main.yaml \
  run.out_dir="$OUT/runs" run.name=two_ranks engine.zero_stage=1 "${TINY[@]}"
check optimizer-resnet50 sh -c '"$0" bench/optimizer.py --devices cuda --arch resnet50 --rounds 3 > "$1"' \
  "$PY" "$OUT/optimizer.json"
check compile-resnet50 timeout --kill-after=10 "$COMPILE_LIMIT_S" sh -c '"$0" bench/compile.py --device cuda \
  --cases resnet50:224:64:5 --arms expsgd --precision bf16_autocast --rounds 3 > "$1"' "$PY" "$OUT/compile.json"
say "done: $fails failed"
exit "$fails"
