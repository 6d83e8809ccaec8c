#!/usr/bin/env bash
# slurm/local-cluster.sh -- a one-node SLURM cluster on this machine, for distill's tests and for trying
# `distill submit` without a real cluster: installs Debian's slurmctld, slurmd, slurm-client and munge if they are
# missing (apt-get, --no-install-recommends), writes /etc/slurm/slurm.conf and starts munged, slurmctld and slurmd
# without systemd, then waits until the node is idle.
#
# Adapted from the project's shared tool slurm_local.sh (tested on Debian 12, Slurm 22.05.8, munge 0.5.15, as root,
# no systemd). Settings that differ from Slurm's defaults, and why:
#   AuthInfo=cred_expire=10 + SchedulerParameters=sched_interval=2,bf_interval=2
#                   a requeued job starts again after ~11 s instead of ~140 s
#   CPUs=max(nproc, 2)   two tasks fit on the node even on a one-CPU runner (override with SLURM_CPUS)
#   MinJobAge=600   finished jobs stay visible to `scontrol show job` for 10 minutes (there is no sacct database)
#   no cgroups      --mem is not enforced; jobs are tracked by process tree
#
# Usage (as root):
#   bash slurm/local-cluster.sh start     install if needed, configure, start, wait until the node is idle
#   bash slurm/local-cluster.sh stop      cancel every job, then stop the three daemons (by their pid files)
#   bash slurm/local-cluster.sh restart   stop, then start
#   bash slurm/local-cluster.sh status    daemons and sinfo
# Idempotent: `start` while it is up only rewrites slurm.conf (and restarts the daemons if it changed).
#
# Environment:
#   SLURM_CPUS=N           advertise N CPUs (default: the real count, at least 2)
#   SLURM_AUTH=munge|none  default munge; none uses auth/none + cred/none and no munged
#   SLURM_USER=slurm|root  the user slurmctld runs as (default slurm)
#   SLURM_WAIT=60          seconds to wait for the node to become idle
#   SLURM_CRED_EXPIRE=10   AuthInfo cred_expire: also the delay before a requeued job may start again
set -euo pipefail

ACTION="${1:-start}"
SLURM_AUTH="${SLURM_AUTH:-munge}"
SLURM_USER="${SLURM_USER:-slurm}"
SLURM_WAIT="${SLURM_WAIT:-60}"
# step-credential lifetime; also the delay before a requeued job may start again
# (Slurm default 120 s, minimum 5 s)
SLURM_CRED_EXPIRE="${SLURM_CRED_EXPIRE:-10}"
SLURM_CPUS="${SLURM_CPUS:-}"
if [[ -z "$SLURM_CPUS" ]]; then
    SLURM_CPUS="$(nproc)"; (( SLURM_CPUS >= 2 )) || SLURM_CPUS=2
fi

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_PID=/run/munge/munged.pid
MUNGE_SOCK=/run/munge/munge.socket.2

log() { echo "[local-cluster] $*" >&2; }

pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in the file is a live process
    [[ -s "$1" ]] || return 1
    local p; p="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$p" =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name="$1" pf="$2" p
    if pid_alive "$pf"; then
        p="$(cat "$pf")"
        log "stopping $name (pid $p)"
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then
            log "$name (pid $p) still alive after 10s, sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    fi
    rm -f "$pf"
}

cancel_all_jobs() {
    # Stopping slurmd does NOT kill running jobs (slurmstepd + job processes survive),
    # so cancel everything through Slurm first and wait for the steps to go away.
    pid_alive "$CTLD_PID" || return 0
    local ids; ids="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    [[ -n "${ids// /}" ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    for _ in $(seq 1 60); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && return 0
        sleep 0.5
    done
    log "jobs still present after 30s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

do_stop() {
    cancel_all_jobs
    # order matters: slurmd first (it may still talk to slurmctld), then slurmctld, then munged
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
}

do_install() {
    local pkgs=(slurmctld slurmd slurm-client)
    [[ "$SLURM_AUTH" == munge ]] && pkgs+=(munge)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # postinst tries invoke-rc.d/systemctl; without systemd that just prints a
        # harmless "could not determine current runlevel" / policy-rc.d message.
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

write_conf() {
    local node cpus sockets cores threads mem
    node="$(hostname -s)"
    # Use slurmd -C for the real topology so slurmd never marks the node INVALID.
    local hw; hw="$(slurmd -C | head -1)"
    cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    sockets="$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")"
    cores="$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")"
    threads="$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    # a bit less than physical so a slightly smaller reading later cannot drain the node
    mem=$(( mem * 9 / 10 ))
    local overrides=""
    if [[ -n "$SLURM_CPUS" && "$SLURM_CPUS" != "$cpus" ]]; then
        # pretend to have SLURM_CPUS cores; config_overrides stops slurmd from
        # draining the node because the configured count differs from the hardware
        cpus="$SLURM_CPUS"; sockets=1; cores="$SLURM_CPUS"; threads=1
        overrides="SlurmdParameters=config_overrides"
    fi

    local authtype credtype
    if [[ "$SLURM_AUTH" == none ]]; then
        authtype=auth/none; credtype=cred/none
    else
        authtype=auth/munge; credtype=cred/munge
    fi

    mkdir -p "$CONF_DIR"
    local tmp; tmp="$(mktemp)"
    cat >"$tmp" <<EOF
# Generated by distill's slurm/local-cluster.sh -- single-node, no cgroups, no accounting DB
ClusterName=localcluster
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=${SLURM_USER}
SlurmdUser=root
AuthType=${authtype}
CredType=${credtype}
# cred_expire also controls how long a requeued job waits before it can start again
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE}
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${CTLD_STATE}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
SchedulerType=sched/backfill
# run the schedulers often so requeued / BeginTime jobs start quickly (defaults 60 s / 30 s)
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# no mail client installed; avoid "Configured MailProg is invalid"
MailProg=/bin/true
ReturnToService=2
# keep finished jobs visible to "scontrol show job" for 10 minutes
MinJobAge=600
# short-ish timeouts so tests do not hang for long
KillWait=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
${overrides}
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} SocketsPerBoard=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"; return 1       # unchanged
    fi
    install -m 0644 "$tmp" "$CONF"; rm -f "$tmp"
    log "wrote $CONF"
    return 0                          # changed
}

prepare_dirs() {
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$CTLD_STATE" "$SLURMD_SPOOL"
    # -R: state files written by an earlier run under another SlurmUser must stay readable
    chown -R "$SLURM_USER:" "$CTLD_STATE"
    chown "$SLURM_USER:" "$LOG_DIR"
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/jobcomp.log"; do
        if [[ -e "$f" ]]; then chown "$SLURM_USER:" "$f"; fi
    done
    chmod 0755 "$RUN_DIR" "$LOG_DIR"
    chmod 0700 "$CTLD_STATE" "$SLURMD_SPOOL"
    # slurmctld (running as SlurmUser) writes its pidfile after dropping privileges
    chown "$SLURM_USER:" "$RUN_DIR"
}

start_munge() {
    [[ "$SLURM_AUTH" == munge ]] || return 0
    if pid_alive "$MUNGE_PID" && [[ -S "$MUNGE_SOCK" ]]; then
        log "munged already running (pid $(cat "$MUNGE_PID"))"; return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --force --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    # munged daemonizes itself and writes /run/munge/munged.pid; run it as user munge
    # (what munge.service does). runuser avoids needing a login shell for 'munge'.
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do [[ -S "$MUNGE_SOCK" ]] && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munge self-test failed"; exit 1; }
    log "munged started (pid $(cat "$MUNGE_PID"))"
}

start_slurmctld() {
    if pid_alive "$CTLD_PID"; then log "slurmctld already running (pid $(cat "$CTLD_PID"))"; return 0; fi
    # -i: ignore errors reading stale state files (safe for a throw-away test cluster)
    /usr/sbin/slurmctld -i
    for _ in $(seq 1 100); do pid_alive "$CTLD_PID" && break; sleep 0.1; done
    pid_alive "$CTLD_PID" || { log "slurmctld failed to start; tail of log:"; tail -20 "$LOG_DIR/slurmctld.log" >&2; exit 1; }
    log "slurmctld started (pid $(cat "$CTLD_PID"))"
}

start_slurmd() {
    if pid_alive "$SLURMD_PID"; then log "slurmd already running (pid $(cat "$SLURMD_PID"))"; return 0; fi
    /usr/sbin/slurmd
    for _ in $(seq 1 100); do pid_alive "$SLURMD_PID" && break; sleep 0.1; done
    pid_alive "$SLURMD_PID" || { log "slurmd failed to start; tail of log:"; tail -20 "$LOG_DIR/slurmd.log" >&2; exit 1; }
    log "slurmd started (pid $(cat "$SLURMD_PID"))"
}

wait_idle() {
    local node; node="$(hostname -s)"
    local deadline=$(( SECONDS + SLURM_WAIT )) st=""
    while (( SECONDS < deadline )); do
        st="$(sinfo -h -n "$node" -o '%T' 2>/dev/null || true)"
        case "$st" in
            idle|mixed|allocated) log "node $node is $st"; sinfo >&2; return 0 ;;
            drain*|down*|inval*|fail*)
                # e.g. left DOWN from a previous run: bring it back
                scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    log "node $node did not become idle within ${SLURM_WAIT}s (state: '${st}')"
    scontrol show node "$node" >&2 || true
    tail -20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

do_start() {
    [[ $EUID -eq 0 ]] || { echo "must run as root" >&2; exit 1; }
    do_install
    if write_conf; then
        # config changed: restart whatever is running so it picks up the new file
        do_stop
    fi
    prepare_dirs
    start_munge
    start_slurmctld
    start_slurmd
    wait_idle
}

case "$ACTION" in
    start|"") do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status)
        for pf in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
            if pid_alive "$pf"; then echo "$pf: $(cat "$pf") alive"; else echo "$pf: not running"; fi
        done
        sinfo 2>&1 || true ;;
    *) echo "usage: $0 [start|stop|restart|status]" >&2; exit 2 ;;
esac
