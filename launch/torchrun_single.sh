#!/usr/bin/env bash
# One node, N processes (one per GPU; CPU ranks on gloo without a GPU).
#   NPROC=8 launch/torchrun_single.sh configs/imagenet/rn50_step_exp.yaml [key=value ...] [--resume auto]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m bigexp train --config "$CONFIG" "$@"
