#!/usr/bin/env bash
# Stop what slurm-up.sh started, by pid files: jobs first, then slurmd, slurmctld, slurmdbd, MariaDB, munged.
# Safe to run when nothing is running. Run as root.
set -u
log() { echo "[slurm-down] $*"; }
# cancel jobs first: slurmstepd (the job processes) survive a slurmd stop
if squeue -h >/dev/null 2>&1; then
  ids=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$ids" ]; then
    scancel --full $ids 2>/dev/null || true
    for i in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
stop() {  # stop <pidfile>: TERM, wait up to 10 s, then KILL
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.2; done
  log "$1: pid $pid did not stop, killing it"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}
for f in /run/slurm/slurmd*.pid; do stop "$f"; done
stop /run/slurm/slurmctld.pid
stop /run/slurm/slurmdbd.pid
if [ -x /etc/init.d/mariadb ] && [ -s /run/mysqld/mysqld.pid ]; then /etc/init.d/mariadb stop >/dev/null 2>&1 || true; fi
stop /run/munge/munged.pid
# the node-name line slurm-up.sh added to /etc/hosts (rewritten in place: /etc/hosts may be a bind mount)
if grep -q '# cpcluster-slurm-up$' /etc/hosts 2>/dev/null; then
  kept=$(grep -v '# cpcluster-slurm-up$' /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
fi
# the sacct stand-in that slurm-up.sh writes when it runs without slurmdbd
SHIM_DIR=${SHIM_DIR:-/usr/local/bin}
if grep -qs "sacct stand-in written by cpcluster slurm-up.sh" "$SHIM_DIR/sacct"; then rm -f "$SHIM_DIR/sacct"; fi
log "stopped"
exit 0
