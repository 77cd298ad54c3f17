#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm 22.05 + munge, daemons started directly, no
# systemd), to try the sbatch scripts and to test preemption/requeue for real.   Root only.
#   slurm/local_cluster.sh install start     # apt install (seconds when present), write slurm.conf, start daemons
#   slurm/local_cluster.sh status            # daemons and `sinfo`;   slurm/local_cluster.sh stop
# Every command is idempotent: `start` on a running cluster with an unchanged slurm.conf does nothing.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
LOG=/var/log/slurm
STATE=/var/lib/slurm
HOST=$(hostname -s)

die() { echo "[local_cluster] $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (apt, munge and slurm daemons)"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

install() {
  if dpkg -s slurm-wlm munge >/dev/null 2>&1; then echo "[local_cluster] slurm-wlm and munge present"; return; fi
  # Packages must not start their services (no systemd here; we start the daemons ourselves with our config).
  local own_policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d; own_policy=1; fi
  echo "[local_cluster] apt-get install slurm-wlm munge"
  apt_install || { apt-get update -qq && apt_install; } || rc=$?   # a failure may be stale package lists
  [ $own_policy = 0 ] || rm -f /usr/sbin/policy-rc.d
  [ $rc = 0 ] || die "apt-get install slurm-wlm munge failed"
  [ -s /etc/munge/munge.key ] || die "munge did not create /etc/munge/munge.key"
}

proctrack() {
  # proctrack/cgroup when this machine lets us make cgroups (here: cgroup v1, freezer mounted, no constraints):
  # it tracks every process of a job, so cancel/requeue kills them all. Else linuxproc (parent-pid tracking:
  # a daemonised or re-parented process escapes it; seen here with a background process).
  local fs; fs=$(stat -fc %T /sys/fs/cgroup 2>/dev/null || true)
  if [ "$fs" = tmpfs ] && [ -d /sys/fs/cgroup/freezer ] && mkdir /sys/fs/cgroup/freezer/.bigexp_probe 2>/dev/null; then
    rmdir /sys/fs/cgroup/freezer/.bigexp_probe; echo "proctrack/cgroup v1"
  elif [ "$fs" = cgroup2fs ] && [ -w /sys/fs/cgroup/cgroup.subtree_control ] \
      && grep -qw pids /sys/fs/cgroup/cgroup.controllers && command -v dbus-daemon >/dev/null; then
    echo "proctrack/cgroup v2"   # slurmd v2 wants systemd's dbus for its scope; without it use linuxproc
  else
    echo "proctrack/linuxproc -"
  fi
}

write_conf() {
  local cpus mem pt cg
  cpus=$(nproc)
  mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.95)}')   # leave a little for the OS; RealMemory > real drains
  read -r pt cg < <(proctrack)
  mkdir -p /etc/slurm
  cat > "$CONF.new" <<EOF
# Written by slurm/local_cluster.sh: one node ($HOST, $cpus CPUs, $mem MB), one partition.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
# A job's credential expires after 10 s (default 120): a requeued job may start again on the same node only after
# that, so requeue -> running again takes ~15 s instead of ~2 min.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
# $( [ "$pt" = proctrack/cgroup ] && echo "cgroup ($cg) works here: job processes are tracked and cleaned up" \
       || echo "no usable cgroups here: linuxproc (a process that re-parents itself escapes job cleanup)" )
ProctrackType=$pt
TaskPlugin=task/none
# On scancel / scontrol requeue / preemption SLURM sends SIGTERM and, KillWait seconds later, SIGKILL. Ranks finish
# their step and checkpoint on SIGTERM; a loaded 2-core machine took over the default 30 s for that (SIGKILLed after
# the save, before the exit), so give them 180 s. A job that exits sooner is not held back by it.
KillWait=180
ReturnToService=2
# scontrol show job keeps a finished job for an hour (default 5 min); sacct --completion has it for good.
MinJobAge=3600
SchedulerType=sched/backfill
# Look at the queue every 5 s (requeued and dependent jobs start within seconds, not at the default 60 s).
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd: accounting off; the job-completion log gives "sacct --completion" one line per finished run.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe=YES: jobs that ask (sbatch -s / --oversubscribe) may share cores; the rest get them to themselves.
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  if [ "$pt" = proctrack/cgroup ]; then
    printf 'CgroupPlugin=cgroup/%s\nCgroupAutomount=yes\n' "$cg" > /etc/slurm/cgroup.conf
  fi
  if cmp -s "$CONF.new" "$CONF"; then rm "$CONF.new"; return 1; fi   # unchanged
  mv "$CONF.new" "$CONF"
}

wait_idle() {
  local i state
  for i in $(seq 1 150); do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*|completing*) echo "[local_cluster] up: node $HOST $state"; return 0 ;;
      down*|drain*) [ "$i" -eq 20 ] && scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  sinfo -N -l || true; tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
  die "node $HOST not idle after 30 s"
}

start() {
  local changed=0
  command -v slurmctld >/dev/null || die "slurm not installed: run '$0 install start'"
  write_conf && changed=1
  if [ $changed = 0 ] && alive $RUN/slurmctld.pid && alive $RUN/slurmd.pid && alive /run/munge/munged.pid; then
    wait_idle; return; fi
  stop quiet
  mkdir -p /run/munge "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
  chown munge:munge /run/munge; chmod 755 /run/munge
  chown slurm:slurm "$RUN" "$LOG" "$STATE/slurmctld"
  [ -s /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge does not work"
  slurmctld                     # daemonises; runs as SlurmUser
  slurmd
  wait_idle
}

stop() {
  local f pid any=0
  for f in $RUN/slurmd.pid $RUN/slurmctld.pid /run/munge/munged.pid; do
    alive "$f" || continue
    pid=$(cat "$f"); kill "$pid"; any=1
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  [ "${1:-}" = quiet ] || { [ $any = 1 ] && echo "[local_cluster] stopped" || echo "[local_cluster] not running"; }
}

status() {
  local f rc=0
  for f in /run/munge/munged.pid $RUN/slurmctld.pid $RUN/slurmd.pid; do
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; rc=3; fi
  done
  [ $rc = 0 ] && sinfo
  return $rc
}

[ $# -gt 0 ] || die "usage: $0 {install|start|stop|status} ..."
for cmd in "$@"; do
  case "$cmd" in
    install|start|stop|status) "$cmd" ;;
    *) die "usage: $0 {install|start|stop|status} ..." ;;
  esac
done
