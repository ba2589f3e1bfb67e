#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost for CI and local tests (as root; facts in
# docs/slurm-one-node.md).
#   scripts/slurm_local.sh install          apt-get install slurm-wlm and munge (Debian) when missing
#   scripts/slurm_local.sh start STATE      write STATE/slurm.conf, start munged (if not running),
#                                           slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_local.sh stop STATE       stop what `start` started, by the PIDs it recorded
# Jobs: SLURM_CONF=STATE/slurm.conf sbatch ...
set -euo pipefail
cmd=${1:?usage: slurm_local.sh install|start STATE|stop STATE}

if [ "$cmd" = install ]; then
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
  exit 0
fi

STATE=$(realpath -m "${2:?STATE directory}")
conf=$STATE/slurm.conf

stop_pid() {  # stop_pid PIDFILE: TERM, wait up to 10 s, then KILL
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}

if [ "$cmd" = stop ]; then
  # the daemons delete their pid files on exit: `start` copied the PIDs to STATE/pids first
  for f in slurmd slurmctld munged; do stop_pid "$STATE/pids/$f"; done
  exit 0
fi

[ "$cmd" = start ] || { echo "unknown command: $cmd" >&2; exit 2; }
mkdir -p "$STATE"/{state,spool,run,log,pids}
cat > "$conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
InactiveLimit=0
MinJobAge=4
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom > /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/pids/munged"
fi
slurmctld -f "$conf"
slurmd -f "$conf" -N localhost
for _ in $(seq 100); do
  [ -s "$STATE/run/slurmctld.pid" ] && [ -s "$STATE/run/slurmd.pid" ] && break
  sleep 0.1
done
cp "$STATE/run/slurmctld.pid" "$STATE/pids/slurmctld"
cp "$STATE/run/slurmd.pid" "$STATE/pids/slurmd"
for _ in $(seq 150); do
  if [ "$(SLURM_CONF=$conf sinfo -h -N -o %T 2>/dev/null)" = idle ]; then exit 0; fi
  sleep 0.2
done
echo "slurm did not reach idle; logs in $STATE/log" >&2
exit 1
