#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing `sdetr` on a real scheduler.
#
#   scripts/local_slurm.sh install   # Debian's slurm-wlm and munge (as root)
#   scripts/local_slurm.sh start     # munged, slurmctld and slurmd; waits until the node is idle
#   scripts/local_slurm.sh status    # sinfo and squeue
#   scripts/local_slurm.sh stop      # stops the daemons (the state folder stays for the next start)
#
# The node is this host with all its CPUs and most of its memory, in one partition `debug`; state, logs and
# the configuration live under $SDETR_SLURM_DIR (default /tmp/sdetr-slurm). Slurm reads the configuration
# from /etc/slurm/slurm.conf, which `start` writes (the previous one is kept as slurm.conf.before-sdetr).
set -euo pipefail

STATE=${SDETR_SLURM_DIR:-/tmp/sdetr-slurm}
CONF=/etc/slurm/slurm.conf

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

install() {
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MiB, a tenth kept back
    mkdir -p "$STATE"/{spool,ctld,log}
    [ -f "$CONF" ] && [ ! -f "$CONF.before-sdetr" ] && ! grep -q "sdetr local cluster" "$CONF" \
        && cp "$CONF" "$CONF.before-sdetr"
    cat > "$CONF" <<EOF
# sdetr local cluster (scripts/local_slurm.sh)
ClusterName=sdetr-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PreemptType=preempt/none
KillWait=10
MinJobAge=300
# a requeued job may start again after 10 s (Slurm's default: 120)
AuthInfo=cred_expire=10
DefMemPerCPU=$(( memory / cpus ))
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    command -v slurmctld >/dev/null || die "no slurmctld: run 'scripts/local_slurm.sh install' first (as root)"
    [ "$(id -u)" = 0 ] || die "start needs root (munged and slurmd run as root here)"
    write_config
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        [ -s /etc/munge/munge.key ] || (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null)
        chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
    fi
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
            echo "local Slurm cluster up: partition debug, $(nproc) CPUs on $(hostname -s); logs in $STATE/log"
            return 0
        fi
        sleep 1
    done
    die "the node did not become idle in 60 s; see $STATE/log/slurmctld.log and slurmd.log"
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    echo "local Slurm cluster stopped"
}

status() {
    sinfo && squeue
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: scripts/local_slurm.sh install|start|status|stop" ;;
esac
