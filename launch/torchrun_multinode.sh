#!/usr/bin/env bash
# Run the SAME command on every node; torchrun's c10d rendezvous joins them.
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29400 RDZV_ID=rn50-exp \
#     launch/torchrun_multinode.sh configs/imagenet/rn50_step_exp.yaml [key=value ...]
# The agent on the endpoint's host serves the rendezvous store (the first one to bind it, if several share a host).
# MAX_RESTARTS (default 1): after a rank fails (its node died, say), each surviving agent stops its ranks and
# re-rendezvous; the group restarts once NNODES agents are back (start the lost node's command again), resuming from
# the last checkpoint (run.resume defaults to auto). The rendezvous host's own death ends the job: start it anew.
# RDZV_CONF=join_timeout=S,... bounds how long the survivors wait for the lost node (torch's default: 600 s).
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
# No store shared between the agents and the ranks (torch 2.14.1's default shares it): a node started again joins a
# later rendezvous round and waits for MASTER_ADDR under that round's key, which the surviving rank-0 agent never
# writes again (it keeps its round-0 bootstrap info: dynamic_rendezvous.py next_rendezvous), so the survivor times
# out collecting the new node's role_info; the ranks' restart-count prefix would disagree too (pytorch#135712,
# bigexp/run/distributed.py agent_store_prefix). Unshared, each worker group's rank 0 serves a fresh store at a fresh
# port. In-place recovery: tests/test_multinode.py.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "${TORCHRUN[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-bigexp}" \
  --max_restarts "${MAX_RESTARTS:-1}" "${EXTRA[@]}" \
  -m bigexp train --config "$CONFIG" "$@"
