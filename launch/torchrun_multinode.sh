#!/usr/bin/env bash
# Run the SAME command on every node; torchrun's c10d rendezvous joins them.
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29400 RDZV_ID=rn50-exp \
#     launch/torchrun_multinode.sh configs/imagenet/rn50_step_exp.yaml [key=value ...]
# The agent on the endpoint's host serves the rendezvous store (the first one to bind it, if several share a host).
# MAX_RESTARTS (default 1): after a rank fails (its node died, say), each surviving agent stops its ranks and
# re-rendezvous; the group restarts once NNODES agents are back (start the lost node's command again), resuming from
# the last checkpoint (run.resume defaults to auto). The rendezvous host's own death ends the job: start it anew.
# LOCAL_ADDR: this node's address as the others reach it (torchrun --local_addr; default: its hostname), e.g. when
#   the hostname resolves to an interface the other nodes cannot reach. RDZV_CONF: torchrun --rdzv_conf (k=v,...).
# PYTHON: run `$PYTHON -m torch.distributed.run` instead of the torchrun on PATH.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
NPROC=${NPROC:-8}
if [ -n "${PYTHON:-}" ]; then TORCHRUN=("$PYTHON" -m torch.distributed.run); else TORCHRUN=(torchrun); fi
EXTRA=() CONF=${RDZV_CONF:-}
if [ -n "${LOCAL_ADDR:-}" ]; then
  EXTRA+=(--local_addr "$LOCAL_ADDR")
  # torchrun guesses the store host from the hostname's addresses; an explicit LOCAL_ADDR says it outright
  [ "$LOCAL_ADDR" != "${RDZV_ENDPOINT%:*}" ] || [[ $CONF == *is_host* ]] || CONF=${CONF:+$CONF,}is_host=true
fi
[ -z "$CONF" ] || EXTRA+=(--rdzv_conf "$CONF")
exec "${TORCHRUN[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-bigexp}" \
  --max_restarts "${MAX_RESTARTS:-1}" "${EXTRA[@]}" \
  -m bigexp train --config "$CONFIG" "$@"
