#!/usr/bin/env bash
# `bigexp compare` on SLURM: one array task per arm of compare.arms, and per seed when compare.seeds has several
# (each `bigexp compare --arm ARM [--seed S]` through slurm/bigexp.sbatch: preemption and requeue as there; run
# directories <arm> or <arm>/seed<s>), then the report (`bigexp compare --layout-only`: layout, gap runs, report.md
# with the seed table) as a job that starts once every task has succeeded (--dependency=afterok:<array>).
#   slurm/compare_array.sh [sbatch options for the arms ...] CONFIG [key=value ...]
#   e.g. slurm/compare_array.sh --ntasks=2 --time=2:00:00 configs/fmnist/main.yaml run.epochs=2
# PYTHON: interpreter with bigexp (default python). The report's output goes to <run.out_dir>/<run.name>/.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
OPTS=(); while [ $# -gt 0 ] && [[ $1 == -* ]]; do OPTS+=("$1"); shift; done
CONFIG=${1:?usage: $0 [sbatch options] CONFIG [key=value ...]}; shift

IFS=$'\t' read -r N LOGDIR NAME ARM_NAMES < <("$PYTHON" -m bigexp config --config "$CONFIG" "$@" | "$PYTHON" -c '
import sys, yaml
from bigexp.analysis.events import seed_run
from bigexp.analysis.seeds import array_tasks
c = yaml.safe_load(sys.stdin) or sys.exit(2)   # bigexp config said why
tasks = array_tasks(c["compare"]["arms"], c["compare"]["seeds"])
print(len(tasks), c["run"]["out_dir"] + "/" + c["run"]["name"], c["run"]["name"],
      " ".join(f"{i}={seed_run(a, s)}" for i, (a, s) in enumerate(tasks)), sep="\t")') ||
  { echo "compare_array: could not resolve $CONFIG $*" >&2; exit 2; }
mkdir -p "$LOGDIR"

ARMS=$(BIGEXP_COMMAND=compare sbatch --parsable --array="0-$((N - 1))" --job-name="bigexp-$NAME" \
  --output="slurm-%x-%A_%a.out" "${OPTS[@]}" "$HERE/bigexp.sbatch" "$CONFIG" "$@")
ARMS=${ARMS%%;*}   # "jobid;cluster" on federated clusters
# The arms' options too (partition, account, -s ...), then one task on one node.
REPORT=$(sbatch --parsable --dependency="afterok:$ARMS" --kill-on-invalid-dep=yes --job-name="bigexp-$NAME-report" \
  "${OPTS[@]}" --nodes=1 --ntasks=1 --output="$LOGDIR/slurm-report-%j.out" \
  --wrap="$(printf '%q ' "$PYTHON" -m bigexp compare --config "$CONFIG" --layout-only "$@")")
echo "arms:   job $ARMS, array tasks 0-$((N - 1)): $ARM_NAMES (task=run directory under $LOGDIR/)"
echo "report: job ${REPORT%%;*} after every arm succeeded (afterok), log $LOGDIR/slurm-report-${REPORT%%;*}.out"
