#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing `poolbench sweep --executor slurm` for real.
#
#   scripts/slurm_local.sh start    install slurm-wlm + munge if missing, configure, start, wait until idle
#   scripts/slurm_local.sh stop     stop slurmd, slurmctld and munged (the ones this script started)
#   scripts/slurm_local.sh status   sinfo + squeue, exit 1 when the cluster does not answer
#
# Idempotent: `start` on a running cluster only checks it. Needs root and a Debian/Ubuntu machine
# (CI runs as root). Everything it writes is /etc/slurm/slurm.conf, the munge key when there is none,
# and SLURM's state and spool folders under /var/spool/poolbench-slurm.
set -euo pipefail

STATE_DIR=/var/spool/poolbench-slurm
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

log() { echo "slurm_local: $*" >&2; }

answers() { timeout 10 sinfo -h -o %T >/dev/null 2>&1; }

node_state() { timeout 10 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local cpus memory
    cpus=$(nproc)
    # Leave the OS and the submitting process some memory: SLURM refuses a node whose RealMemory exceeds what it has.
    memory=$(free -m | awk '/^Mem:/ {m = $2 - 1024; if (m < 512) m = int($2 / 2); print m}')
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/d" /var/log/slurm
    cat >"$CONF" <<EOF
# Written by poolbench scripts/slurm_local.sh: a one-node test cluster.
ClusterName=poolbench
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
MpiDefault=none
TaskPlugin=task/none
# Schedule cores, not whole nodes: a 1-CPU task takes 1 CPU.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Start the next array task as soon as one ends (the backfill scheduler waits up to 30 s).
SchedulerType=sched/builtin
# Look at the queue every 2 s (default 60): a requeued task becomes eligible again without an event to trigger a pass.
SchedulerParameters=sched_interval=2
# Sweeps are job arrays with one task per run.
MaxArraySize=100001
MaxJobCount=200000
# Requeue and cancel in seconds, not the default 30 s grace.
KillWait=5
MinJobAge=600
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# A job that asks for no memory gets its CPUs' share, not the whole node.
DefMemPerCPU=$((memory / cpus))
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    # Tools that look for cgroup.conf complain when it is absent even with cgroups unused.
    [ -f /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" >/etc/slurm/cgroup.conf
}

start_munge() {
    if pgrep -u munge -x munged >/dev/null; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    su -s /bin/sh munge -c "/usr/sbin/munged"
}

start() {
    case "$(node_state || true)" in
        idle|mixed|allocated) log "already running: $(sinfo -h -o '%P %D %T %C' | head -n1)"; return ;;
    esac
    install_packages
    write_config
    start_munge
    for _ in $(seq 1 60); do
        # (Re)started inside the loop: a daemon still shutting down from a `stop` exits meanwhile.
        pgrep -x slurmctld >/dev/null || slurmctld
        pgrep -x slurmd >/dev/null || slurmd
        state=$(node_state || true)
        case "$state" in
            idle) log "up: node $HOST idle ($(nproc) CPUs)"; return ;;
            down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "the node did not become idle within 60 s (state: ${state:-none}); see /var/log/slurm/"
    exit 1
}

stop_pid() {  # the daemon's own pid file, never a broad name match
    local file=$1
    if [ -s "$file" ]; then
        kill "$(cat "$file")" 2>/dev/null || true
    fi
}

stop() {
    scancel --user=root >/dev/null 2>&1 || true
    stop_pid "$STATE_DIR/slurmd.pid"
    stop_pid "$STATE_DIR/slurmctld.pid"
    for _ in $(seq 1 60); do  # slurmd waits for its job steps to end
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 1
    done
    if [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) answers && sinfo && squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
