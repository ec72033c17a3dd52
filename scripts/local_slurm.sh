#!/usr/bin/env bash
# A single-node Slurm on this machine, for the `slurm` tests and for trying `make submit` by hand.
#
#   scripts/local_slurm.sh install   apt-get install slurmctld slurmd slurm-client munge (needs root)
#   scripts/local_slurm.sh start     write $DIR/slurm.conf, start munged (if none runs), slurmctld and
#                                    slurmd, wait until the node is idle; prints `export SLURM_CONF=...`
#   scripts/local_slurm.sh stop      stop the daemons this script started, by the PIDs it saved
#   scripts/local_slurm.sh status    the daemons' PIDs and `sinfo`
#
# DIR (default /tmp/freqdiff-slurm, or $FREQDIFF_SLURM_DIR) holds the config, state, spool, logs and
# PID files; nothing under /etc is written. Clients find this Slurm through SLURM_CONF=$DIR/slurm.conf
# (jobs inherit it). Runs as root (SlurmUser root), one partition `local` with this machine's CPUs and
# memory as `slurmd -C` reports them; no accounting (squeue knows a job while it is queued or running,
# and for MinJobAge seconds after it ends). Debian 12's Slurm 22.05 and MUNGE 0.5 were used.
set -euo pipefail

DIR=${FREQDIFF_SLURM_DIR:-/tmp/freqdiff-slurm}
CONF=$DIR/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null && return 0
  [[ $(id -u) == 0 ]] || die "installing needs root (apt-get install slurmctld slurmd slurm-client munge)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >"$DIR.apt.log" 2>&1 ||
    die "apt-get install failed; see $DIR.apt.log"
}

write_conf() {
  local node cpus mem host
  host=$(hostname -s)
  node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  mkdir -p "$DIR"/{state,spool,log}
  cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: a single-node Slurm for tests
ClusterName=freqdiff-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${FREQDIFF_SLURMCTLD_PORT:-6817}
SlurmdPort=${FREQDIFF_SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid.slurm
SlurmdPidFile=$DIR/slurmd.pid.slurm
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
KillWait=15
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # a munged already answers
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  [[ -f /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (reinstall munge)"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$DIR/munged.pid"  # started here: stopped by `stop`
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not answer; see /var/log/munge/munged.log"
}

cmd_start() {
  cmd_install
  mkdir -p "$DIR"
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    echo "export SLURM_CONF=$CONF"; return 0
  fi
  cmd_stop >/dev/null 2>&1 || true
  write_conf
  start_munge
  export SLURM_CONF=$CONF
  setsid slurmctld -D -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 </dev/null & echo $! >"$DIR/slurmctld.pid"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  setsid slurmd -D -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 </dev/null & echo $! >"$DIR/slurmd.pid"
  local state=""
  for _ in $(seq 300); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1) || true
    [[ $state == idle ]] && break
    sleep 0.1
  done
  [[ $state == idle ]] || die "the node is '$state', not idle; see $DIR/log/"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  local name
  for name in slurmd slurmctld munged; do
    if alive "$DIR/$name.pid"; then
      kill "$(cat "$DIR/$name.pid")"
      for _ in $(seq 50); do alive "$DIR/$name.pid" || break; sleep 0.1; done
      alive "$DIR/$name.pid" && kill -9 "$(cat "$DIR/$name.pid")"
    fi
    rm -f "$DIR/$name.pid"
  done
  echo "stopped"
}

cmd_status() {
  local name
  for name in munged slurmctld slurmd; do
    if alive "$DIR/$name.pid"; then echo "$name running, pid $(cat "$DIR/$name.pid")"; else echo "$name: not started here"; fi
  done
  [[ -f $CONF ]] && SLURM_CONF=$CONF sinfo 2>&1 || true
}

case ${1:-} in
  install) mkdir -p "$(dirname "$DIR")"; cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) die "usage: scripts/local_slurm.sh install|start|stop|status" ;;
esac
