#!/usr/bin/env bash
# The deepspeed launcher over ssh with a hostfile ("node001 slots=8" per line).
#   HOSTFILE=hostfile launch/deepspeed_hostfile.sh configs/imagenet/rn50_step_exp.yaml [key=value ...]
# --no_local_rank: bigexp reads LOCAL_RANK from the environment, so no --local_rank argument is appended.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${HOSTFILE:?set HOSTFILE}"
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
  --module bigexp train --config "$CONFIG" "$@"
