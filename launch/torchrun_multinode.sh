#!/usr/bin/env bash
# Run the SAME command on every node; torchrun's c10d rendezvous joins them.
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29400 RDZV_ID=rn50-exp \
#     launch/torchrun_multinode.sh configs/imagenet/rn50_step_exp.yaml [key=value ...]
# MAX_RESTARTS (default 1): torchrun restarts every rank after a rank failure; the run resumes from its last
# checkpoint (run.resume defaults to auto).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
NPROC=${NPROC:-8}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-bigexp}" \
  --max_restarts "${MAX_RESTARTS:-1}" \
  -m bigexp train --config "$CONFIG" "$@"
