#!/usr/bin/env bash
# A real multi-node Slurm cluster on one machine, so `--nodes 2` runs are testable here.
#
#   sudo tools/local_slurm_multinode.sh start [--nodes N]   # default 2 nodes
#   tools/local_slurm_multinode.sh status                   # exit 0 if all nodes usable
#   sudo tools/local_slurm_multinode.sh stop                # daemons, namespaces, /etc/hosts
#   export SLURM_CONF=/tmp/forge-slurm-multinode/slurm.conf # then sbatch/srun/submit.py
#   sbatch --nodes=2 --ntasks-per-node=1 slurm/pretrain_tiny.sh
#
# Each node forge-n<i> is one slurmd in its own network namespace (its own loopback and
# one address on a bridge) and its own UTS namespace (hostname forge-n<i>). A job's ranks
# on different nodes therefore reach each other only the way they do on a cluster:
# through the first node's name in SLURM_JOB_NODELIST, resolved to its address. Nothing
# on 127.0.0.1 is shared between nodes, so a rendezvous that wrongly uses localhost fails.
#
#   host namespace:  slurmctld on <subnet>.1:6827, bridge forgebr0 (<subnet>.1/24)
#   netns forge-n1:  slurmd -N forge-n1 on <subnet>.2:6818, hostname forge-n1
#   netns forge-n2:  slurmd -N forge-n2 on <subnet>.3:6818, hostname forge-n2
#   /etc/hosts:      a marked block "<subnet>.2 forge-n1" ..., removed again by 'stop'
#
# It runs side by side with tools/local_slurm.sh's one-node cluster (other scratch dir,
# controller port, cluster name and job ids; munged is shared, and stopped by whichever
# cluster stops last). /etc/slurm/slurm.conf stays the one-node's, so clients of this
# cluster need SLURM_CONF (sbatch passes it on to the job, so the job's srun uses it).
#
# Needs root, iproute2 (installed with apt-get when missing) and a kernel, or gVisor,
# that allows network namespaces, veth pairs and a bridge. Where it does not, 'start'
# exits with status 3 and names the failing command.
#
# Environment:
#   FORGE_SLURM_MULTINODE_DIR   scratch dir (default /tmp/forge-slurm-multinode)
#   FORGE_SLURM_NODES           number of nodes when --nodes is not given (default 2)
#   FORGE_SLURM_SUBNET          first three octets of the private /24 (default 10.77.0)
#   FORGE_SLURM_MULTINODE_CTLD_PORT   slurmctld port (default 6827; the one-node's is 6817)
#   FORGE_SLURM_TIMEOUT         seconds to wait for the nodes to become idle (default 60)
set -euo pipefail

# Processes, install, munged, node memory and state, errors, job cancelling: shared with
# tools/local_slurm.sh.
# shellcheck source-path=SCRIPTDIR source=local_slurm_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_slurm_lib.sh"

LOG_TAG=local_slurm_multinode
SCRATCH="${FORGE_SLURM_MULTINODE_DIR:-/tmp/forge-slurm-multinode}"
CONF="$SCRATCH/slurm.conf"
export SLURM_CONF="$CONF"
NUM_NODES="${FORGE_SLURM_NODES:-2}"
SUBNET="${FORGE_SLURM_SUBNET:-10.77.0}"
CTLD_PORT="${FORGE_SLURM_MULTINODE_CTLD_PORT:-6827}"
TIMEOUT="${FORGE_SLURM_TIMEOUT:-60}"
SLURMD_PORT=6818 # one per network namespace, so every node can use the default
BRIDGE=forgebr0
NODE_PREFIX=forge-n
HOSTS_FILE=/etc/hosts
HOSTS_BEGIN="# >>> megatron-forge tools/local_slurm_multinode.sh (removed by its 'stop')"
HOSTS_END="# <<< megatron-forge tools/local_slurm_multinode.sh"
CTLD_HOST="$(hostname -s)"
EXIT_NO_NETNS=3
# munged is shared with the one-node cluster: its pid file lives in that cluster's scratch
# dir, so whichever of the two clusters stops last stops it.
MUNGE_SCRATCH="${FORGE_SLURM_DIR:-/tmp/forge-slurm}"

node_name() { echo "$NODE_PREFIX$1"; }     # node i -> forge-n<i>; its netns has the same name
node_addr() { echo "$SUBNET.$(($1 + 1))"; } # .1 is the bridge (the controller's side)
veth_host() { echo "forge-v$1"; }           # host end of node i's veth pair (<=15 chars)
bridge_addr() { echo "$SUBNET.1"; }
nodelist() { echo "${NODE_PREFIX}[1-$NUM_NODES]"; }

# Nodes that this scratch dir last started: stop must undo them even if --nodes changed.
started_nodes() {
    if [[ -s "$SCRATCH/nodes" ]]; then cat "$SCRATCH/nodes"; else echo "$NUM_NODES"; fi
}

# ------------------------------------------------------------------- network

ensure_iproute2() {
    command -v ip >/dev/null && return 0
    command -v apt-get >/dev/null || die "'ip' (iproute2) is missing and apt-get is not available"
    log "installing iproute2 with apt-get ('ip' is missing)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 iproute2 \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends -o DPkg::Lock::Timeout=300 iproute2; }
}

# Run one network setup command; on failure say which and exit 3 (no namespaces here).
net() {
    local out
    if ! out="$("$@" 2>&1)"; then
        echo "[local_slurm_multinode] ERROR: '$*' failed: $out" >&2
        echo "[local_slurm_multinode] this machine does not allow the network namespaces," \
            "veth pairs and bridge a one-machine multi-node cluster needs" >&2
        teardown_network "$NUM_NODES" >/dev/null 2>&1 || true
        exit "$EXIT_NO_NETNS"
    fi
}

# Our private /24 must not already be routed somewhere else (a LAN, a VPN, docker).
check_subnet_free() {
    local used
    used="$(ip -o -4 addr show to "$SUBNET.0/24" | awk -v br="$BRIDGE" '$2 != br {print $2, $4}')"
    [[ -z "$used" ]] || die "subnet $SUBNET.0/24 is already in use here ($used); pick another with FORGE_SLURM_SUBNET=10.x.y"
}

setup_network() {
    local i ns veth
    check_subnet_free
    net ip link add "$BRIDGE" type bridge
    net ip addr add "$(bridge_addr)/24" dev "$BRIDGE"
    net ip link set "$BRIDGE" up
    for ((i = 1; i <= NUM_NODES; i++)); do
        ns="$(node_name "$i")"
        veth="$(veth_host "$i")"
        net ip netns add "$ns"
        net ip link add "$veth" type veth peer name "${veth}p"
        net ip link set "${veth}p" netns "$ns"
        net ip link set "$veth" master "$BRIDGE"
        net ip link set "$veth" up
        net ip netns exec "$ns" ip link set lo up
        net ip netns exec "$ns" ip link set "${veth}p" name eth0
        net ip netns exec "$ns" ip addr add "$(node_addr "$i")/24" dev eth0
        net ip netns exec "$ns" ip link set eth0 up
    done
    log "network: bridge $BRIDGE $(bridge_addr)/24, nodes $(nodelist) at $(node_addr 1)..$(node_addr "$NUM_NODES")"
}

# Idempotent: removes whatever part of the network an earlier start left behind.
teardown_network() {
    local n="$1" i ns
    for ((i = 1; i <= n; i++)); do
        ns="$(node_name "$i")"
        if ip netns list 2>/dev/null | grep -qw "^$ns"; then
            ip netns del "$ns" 2>/dev/null || true
        fi
        # The host end normally goes with the namespace, but not at once under gVisor.
        ip link del "$(veth_host "$i")" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# ------------------------------------------------------------------ /etc/hosts

# Node names must resolve everywhere (MASTER_ADDR is the nodelist's first name, and
# gloo binds to the address of the process's own hostname), as a cluster's DNS does.
# /etc/hosts is rewritten in place: under containers it is often a bind mount that
# cannot be replaced by a rename.
remove_hosts_block() {
    [[ -f "$HOSTS_FILE" ]] && grep -qF "$HOSTS_BEGIN" "$HOSTS_FILE" || return 0
    local kept
    kept="$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" \
        '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' "$HOSTS_FILE")"
    printf '%s\n' "$kept" >"$HOSTS_FILE"
}

add_hosts_block() {
    local i
    remove_hosts_block
    {
        echo "$HOSTS_BEGIN"
        for ((i = 1; i <= NUM_NODES; i++)); do
            echo "$(node_addr "$i") $(node_name "$i")"
        done
        echo "$HOSTS_END"
    } >>"$HOSTS_FILE"
}

# -------------------------------------------------------------------- conf

write_conf() {
    local cpus mem i
    cpus="$(nproc)"
    # The nodes share this machine's memory: promise each its share.
    mem=$(($(real_memory_mb) / NUM_NODES))
    mkdir -p "$SCRATCH/state" "$SCRATCH/log"
    chmod 0755 "$SCRATCH"
    for ((i = 1; i <= NUM_NODES; i++)); do
        # Job scripts are staged in the spool dir; one per node (%n in the conf).
        mkdir -p "$SCRATCH/spool-$(node_name "$i")"
        chmod 0755 "$SCRATCH/spool-$(node_name "$i")"
    done
    {
        cat <<EOF
$MULTINODE_CONF_MARKER: $NUM_NODES nodes, each a
# slurmd in its own network namespace. Stop with: tools/local_slurm_multinode.sh stop
ClusterName=forgemulti
SlurmctldHost=$CTLD_HOST($(bridge_addr))
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SCRATCH/state
# %n: the node name, so the slurmd daemons of one machine keep apart.
SlurmdSpoolDir=$SCRATCH/spool-%n
SlurmdPidFile=$SCRATCH/slurmd-%n.pid
SlurmdLogFile=$SCRATCH/log/slurmd-%n.log
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
# Job ids apart from the one-node cluster's (which start at 1), so run dirs named by
# job id (runs/<name>-<id>) never collide between the two.
FirstJobId=500000
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
EOF
        for ((i = 1; i <= NUM_NODES; i++)); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(nodelist) Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    chmod 0644 "$CONF"
    echo "$NUM_NODES" >"$SCRATCH/nodes"
    log "wrote $CONF ($NUM_NODES nodes, CPUs=$cpus, RealMemory=${mem}MB each)"
}

# ----------------------------------------------------------------- daemons

slurmd_pidfile() { echo "$SCRATCH/slurmd-$(node_name "$1").pid"; }

start_slurmctld() {
    log "starting slurmctld -f $CONF (port $CTLD_PORT)"
    slurmctld -f "$CONF" || fail_with_logs "slurmctld exited with status $?" slurmctld
    wait_for_pidfile slurmctld "$SCRATCH/slurmctld.pid" slurmctld
}

# slurmd inside the node's network namespace, in a fresh UTS namespace named after the
# node, so the jobs it starts see the hostname and addresses a cluster node would have.
# nsenter, not 'ip netns exec': that one mounts a fresh /sys, without the cgroup mounts
# slurmd's cgroup plugin probes ("No filesystem mounted on /sys/fs/cgroup").
start_slurmd() {
    local i="$1" node
    node="$(node_name "$i")"
    log "starting slurmd -N $node in netns $node ($(node_addr "$i"))"
    # shellcheck disable=SC2016  # $1.. expand in the inner sh
    nsenter --net="/run/netns/$node" unshare --uts -- sh -c 'hostname "$1" && exec "$2" -N "$1" -f "$3"' \
        sh "$node" "$(command -v slurmd)" "$CONF" \
        || fail_with_logs "slurmd for $node exited with status $?" "slurmd-$node"
    wait_for_pidfile slurmd "$(slurmd_pidfile "$i")" "slurmd-$node"
}

# Both daemons fork; the child writes the pid file a moment after the parent returns.
wait_for_pidfile() {
    local prog="$1" pidfile="$2" logname="$3"
    for _ in $(seq 1 50); do
        live_pid "$pidfile" "$prog" >/dev/null && return 0
        sleep 0.2
    done
    fail_with_logs "$prog did not stay up (no live pid in $pidfile after 10s)" "$logname"
}

all_daemons_alive() {
    local i
    live_pid "$SCRATCH/slurmctld.pid" slurmctld >/dev/null || return 1
    for ((i = 1; i <= NUM_NODES; i++)); do
        live_pid "$(slurmd_pidfile "$i")" slurmd >/dev/null || return 1
    done
}

# "<node> <state>" per node as sinfo prints them ("" if the controller does not answer).
node_states() {
    [[ -f "$CONF" ]] || return 0
    timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null || true
}

all_nodes_usable() {
    local states i state
    states="$(node_states)"
    for ((i = 1; i <= NUM_NODES; i++)); do
        state="$(awk -v n="$(node_name "$i")" '$1 == n {print $2; exit}' <<<"$states")"
        state_is_usable "$state" || return 1
    done
}

wait_for_idle() {
    local deadline=$((SECONDS + TIMEOUT)) states node state resumed_at=-100 i logs=(slurmctld)
    for ((i = 1; i <= NUM_NODES; i++)); do logs+=("slurmd-$(node_name "$i")"); done
    log "waiting up to ${TIMEOUT}s for nodes $(nodelist) to be idle"
    while ((SECONDS < deadline)); do
        all_daemons_alive || fail_with_logs "a daemon died while starting" "${logs[@]}"
        if all_nodes_usable; then
            log "nodes $(nodelist) usable after $((SECONDS - deadline + TIMEOUT))s"
            return 0
        fi
        # DOWN/DRAIN saved from an earlier run needs an explicit resume.
        states="$(node_states)"
        while read -r node state; do
            case "$state" in
                inval)
                    timeout 10 scontrol show node "$node" >&2 || true
                    fail_with_logs "node $node is INVALID: slurm.conf disagrees with what its slurmd found" slurmctld
                    ;;
                down | drain | drng | fail)
                    if ((SECONDS - resumed_at >= 5)); then
                        log "node $node is '$state'; resuming it"
                        scontrol update nodename="$node" state=resume || true
                        resumed_at=$SECONDS
                    fi
                    ;;
            esac
        done <<<"$states"
        sleep 1
    done
    timeout 10 sinfo -N >&2 || true
    fail_with_logs "nodes not all idle after ${TIMEOUT}s" "${logs[@]}"
}

# --------------------------------------------------------------------- start

parse_nodes_flag() {
    while (($#)); do
        case "$1" in
            --nodes) NUM_NODES="${2:?--nodes needs a number}"; shift 2 ;;
            --nodes=*) NUM_NODES="${1#--nodes=}"; shift ;;
            *) die "unknown argument '$1' (usage: $0 start [--nodes N])" ;;
        esac
    done
    if ! [[ "$NUM_NODES" =~ ^[0-9]+$ ]] || ((NUM_NODES < 1 || NUM_NODES > 200)); then
        die "--nodes must be a number from 1 to 200, got '$NUM_NODES'"
    fi
}

cmd_start() {
    require_root start
    parse_nodes_flag "$@"
    local t0=$SECONDS i
    install_packages
    ensure_iproute2
    if [[ -s "$SCRATCH/nodes" && "$(cat "$SCRATCH/nodes")" == "$NUM_NODES" ]] \
        && all_daemons_alive && munge_works && all_nodes_usable; then
        log "already up: nodes $(nodelist) (export SLURM_CONF=$CONF)"
        return 0
    fi
    # Whatever an earlier, interrupted start left (daemons, namespaces) goes first, so
    # the conf, the namespaces and the daemons are all from this start.
    stop_cluster quiet
    mkdir -p "$SCRATCH/log"
    setup_network
    add_hosts_block
    mkdir -p "$MUNGE_SCRATCH/log"
    SCRATCH="$MUNGE_SCRATCH" start_munged
    write_conf
    start_slurmctld
    for ((i = 1; i <= NUM_NODES; i++)); do
        start_slurmd "$i"
    done
    wait_for_idle
    log "up in $((SECONDS - t0))s: $NUM_NODES nodes $(nodelist), partition debug."
    log "use it with: export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------- stop

# Processes still inside a node's namespace once its slurmd is gone were started by
# that slurmd (job tasks that ignored the kill): end them by pid.
kill_namespace_leftovers() {
    local ns="$1" pids
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)"
    [[ -n "${pids// /}" ]] || return 0
    log "ending leftover processes in netns $ns: $pids"
    # shellcheck disable=SC2086  # one pid per word
    kill -KILL $pids 2>/dev/null || true
}

# Stop daemons, then remove the namespaces, bridge and /etc/hosts block. With 'quiet',
# as the first step of a start: no log lines for parts that are not there.
stop_cluster() {
    local n i other
    n="$(started_nodes)"
    ((n > NUM_NODES)) || n="$NUM_NODES"
    cancel_all_jobs
    for ((i = 1; i <= n; i++)); do
        if [[ "${1:-}" != quiet ]] || live_pid "$(slurmd_pidfile "$i")" slurmd >/dev/null; then
            stop_daemon slurmd "$(slurmd_pidfile "$i")"
        fi
        if ip netns list 2>/dev/null | grep -qw "^$(node_name "$i")"; then
            kill_namespace_leftovers "$(node_name "$i")"
        fi
    done
    if [[ "${1:-}" != quiet ]] || live_pid "$SCRATCH/slurmctld.pid" slurmctld >/dev/null; then
        stop_daemon slurmctld "$SCRATCH/slurmctld.pid"
    fi
    # munged stays while another cluster (the one-node one) uses it; a start keeps it too.
    if [[ "${1:-}" != quiet ]]; then
        stop_munged_unless_shared "$MUNGE_SCRATCH/munged.pid"
    fi
    teardown_network "$n"
    remove_hosts_block
}

cmd_stop() {
    require_root stop
    stop_cluster
    log "stopped (daemons, netns $(node_name 1).., bridge $BRIDGE, /etc/hosts block)"
}

# -------------------------------------------------------------------- status

cmd_status() {
    NUM_NODES="$(started_nodes)"
    if [[ ! -f "$CONF" ]] || ! live_pid "$SCRATCH/slurmctld.pid" slurmctld >/dev/null; then
        log "not running (start it: sudo $0 start)"
        return 1
    fi
    timeout 10 sinfo -N 2>&1 || { log "no answer from slurmctld (conf $CONF)"; return 1; }
    timeout 10 squeue 2>&1 || true
    if all_daemons_alive && all_nodes_usable; then
        log "up: nodes $(nodelist) (export SLURM_CONF=$CONF)"
        return 0
    fi
    log "not usable: a slurmd is down or a node is not idle/allocated"
    return 1
}

case "${1:-}" in
    start)
        shift
        cmd_start "$@"
        ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start [--nodes N] | stop | status" >&2
        exit 2
        ;;
esac
