#!/usr/bin/env bash
# Start a real SLURM cluster on this one machine (Debian 12 packages: slurm 22.05, munge, MariaDB), as root, no
# systemd, no cgroups. Used by `make test-slurm`; also a way to try cpcluster's SLURM path on a workstation.
# Stop it with slurm-down.sh (beside this file). Running this again restarts the cluster with the new settings.
#
#   NODES=n            slurmd "nodes" n1..nN on this machine (default 1: one node named after the host).
#                      NODES=2 gives a real 2-node job (ranks on n1 and n2).
#   WITH_SLURMDBD=1    also MariaDB + slurmdbd, so that `sacct` works. submitit reads job states with sacct;
#                      without it a job killed from outside stays UNKNOWN and result() waits forever.
#   SHIM_DIR=dir       (no slurmdbd) write a small `sacct` stand-in there instead (default /usr/local/bin).
#   MAX_ARRAY_SIZE=k   MaxArraySize in slurm.conf (SLURM's default 1001); set it low to test array splitting.
#   PARTITION=name     the one partition (default "debug").
#
# Settings that matter for tests (see the comments in slurm.conf below): DefMemPerCPU (else jobs run one at a
# time), AuthInfo=cred_expire=10 and fast scheduler intervals (a requeued job restarts in ~11 s, not ~2 min).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${NODES:-1}
WITH_SLURMDBD=${WITH_SLURMDBD:-0}
SHIM_DIR=${SHIM_DIR:-/usr/local/bin}
MAX_ARRAY_SIZE=${MAX_ARRAY_SIZE:-1001}
PARTITION=${PARTITION:-debug}
export DEBIAN_FRONTEND=noninteractive
T0=$SECONDS
SHIM_MARK="sacct stand-in written by cpcluster slurm-up.sh"
log() { echo "[slurm-up] $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: run as root (it installs packages and starts daemons)" >&2; exit 2; }
case "$NODES" in ''|*[!0-9]*|0) echo "slurm-up.sh: NODES must be a positive integer, got '$NODES'" >&2; exit 2;; esac
case "$MAX_ARRAY_SIZE" in ''|*[!0-9]*|0) echo "slurm-up.sh: MAX_ARRAY_SIZE must be a positive integer" >&2; exit 2;; esac

# A cluster from an earlier run (maybe with other settings): stop it first, so this script can be rerun.
for f in /run/slurm/*.pid /run/munge/munged.pid /run/mysqld/mysqld.pid; do
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    log "stopping the cluster that is already running"; "$HERE/slurm-down.sh"; break
  fi
done
# From here on, a failure stops whatever was started: no daemons left behind.
trap 'rc=$?; if [ $rc -ne 0 ]; then log "failed (exit $rc); last log lines:"; tail -n 15 /var/log/slurm/*.log 2>/dev/null || true; "$HERE/slurm-down.sh" >/dev/null 2>&1 || true; fi' EXIT

# --- packages (apt only when something is missing) ---
pkgs="slurmctld slurmd slurm-client munge"
[ "$WITH_SLURMDBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=$(for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -z "$missing" ]; then
  log "packages already installed"
else
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  log "packages installed after $((SECONDS-T0))s"
fi

# --- munge ---
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile=/etc/munge/munge.key; fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge; chown munge:munge /run/munge; chmod 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
for i in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null

# --- slurm.conf ---
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm /var/log/slurm
if [ "$NODES" -gt 1 ]; then
  NODELINES=""
  for k in $(seq "$NODES"); do
    NODELINES="${NODELINES}NodeName=n${k} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((17000+k)) CPUs=${NCPU} RealMemory=$((MEM_MB/NODES)) State=UNKNOWN
"
    mkdir -p /var/spool/slurmd/n${k}
  done
  SLURMD_SPOOL=/var/spool/slurmd/%n; SLURMD_PID=/run/slurm/slurmd-%n.pid; SLURMD_LOG=/var/log/slurm/slurmd-%n.log
  # on a real cluster node names resolve (torch.distributed's MASTER_ADDR is the first node's name): map ours
  # to this machine; slurm-down.sh removes the line again
  if ! grep -q '# cpcluster-slurm-up$' /etc/hosts; then
    echo "127.0.0.1 $(for k in $(seq "$NODES"); do printf 'n%s ' "$k"; done)# cpcluster-slurm-up" >> /etc/hosts
  fi
  # several slurmd share the machine's CPUs: let the config win over what slurmd detects
  OVERRIDES="SlurmdParameters=config_overrides"
else
  NODELINES="NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM_MB} State=UNKNOWN
"
  SLURMD_SPOOL=/var/spool/slurmd; SLURMD_PID=/run/slurm/slurmd.pid; SLURMD_LOG=/var/log/slurm/slurmd.log
  OVERRIDES=""
fi
if [ "$WITH_SLURMDBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat > /etc/slurm/slurm.conf.tmp <<EOF
# written by cpcluster/cluster/slurm-up.sh (NODES=${NODES} WITH_SLURMDBD=${WITH_SLURMDBD} MAX_ARRAY_SIZE=${MAX_ARRAY_SIZE})
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire+1 s before restarting (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=${SLURMD_LOG}
${OVERRIDES}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without this every job takes all node memory and jobs run one at a time
DefMemPerCPU=1000
SchedulerType=sched/backfill
# fast scheduling for tests (defaults: 60 s main loop, 30 s backfill)
SchedulerParameters=sched_interval=2,bf_interval=2
# arrays with more tasks than this must be split by the submitter (cpcluster.slurm.submit_array does)
MaxArraySize=${MAX_ARRAY_SIZE}
JobRequeue=1
${ACCT}
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
${NODELINES}PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv /etc/slurm/slurm.conf.tmp /etc/slurm/slurm.conf

# --- optional accounting (mariadb + slurmdbd) ---
if [ "$WITH_SLURMDBD" = 1 ]; then
  /etc/init.d/mariadb start >/dev/null
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<'EOF'
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  slurmdbd
  for i in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.3; done
  sacctmgr -i add cluster ci >/dev/null 2>&1 || true
  # a stand-in from an earlier run without slurmdbd would shadow the real sacct
  if grep -qs "$SHIM_MARK" "$SHIM_DIR/sacct"; then rm -f "$SHIM_DIR/sacct"; fi
elif [ -n "$SHIM_DIR" ]; then
  mkdir -p "$SHIM_DIR"
  if [ -e "$SHIM_DIR/sacct" ] && ! grep -qs "$SHIM_MARK" "$SHIM_DIR/sacct"; then
    log "$SHIM_DIR/sacct exists and is not our stand-in: not replacing it (use WITH_SLURMDBD=1 or SHIM_DIR=)"
  else
  sed "s/SHIM_MARK/$SHIM_MARK/" > "$SHIM_DIR/sacct" <<'EOF'
#!/bin/sh
# SHIM_MARK: answers `sacct ... -j ID [-j ID]` from slurmctld (no slurmdbd); slurm-down.sh removes it
ids=
while [ $# -gt 0 ]; do
  case "$1" in -j|--jobs) ids="$ids${ids:+,}$2"; shift 2 ;; *) shift ;; esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue -h -r -t all -j "$ids" -o "%i|%T|%N" 2>/dev/null
exit 0
EOF
  chmod +x "$SHIM_DIR/sacct"
  fi
fi

# --- daemons ---
slurmctld
if [ "$NODES" -gt 1 ]; then
  for k in $(seq "$NODES"); do slurmd -N n${k}; done
else
  slurmd
fi
idle() { [ "$(sinfo -h -o '%T %D' 2>/dev/null)" = "idle $NODES" ]; }
for i in $(seq 120); do idle && break; sleep 0.5; done
sinfo
idle || { log "nodes did not become idle"; exit 1; }
log "cluster idle after $((SECONDS-T0))s (nodes=$NODES slurmdbd=$WITH_SLURMDBD MaxArraySize=$MAX_ARRAY_SIZE)"
