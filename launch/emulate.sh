#!/usr/bin/env bash
# An emulated cluster on this machine (root, iproute2):
#   launch/emulate.sh NODES PROCS_PER_NODE [--rate RATE] [--name NAME] [--script PATH] [--] [dpnet.train args...]
#
# Each node is a network namespace with its own hostname (a UTS namespace: node0, node1, ...), its own /dev/shm (a
# directory of this machine's /dev/shm bound over it in a mount namespace of its own) and one link, limited to RATE in
# each direction (a tbf qdisc at both ends), to a bridge in a namespace of its own (the switch). MPICH's mpiexec
# (Hydra) runs on node0 and starts the other nodes' processes through a launcher that enters their namespaces, as ssh
# would enter a machine: MPI sees NODES machines of PROCS_PER_NODE processes each. Everything made is removed on every
# way out (normal end, failure, Ctrl-C, SIGTERM or SIGHUP to this script): the job's processes, the namespaces with
# their links, the /dev/shm directories. Files a job leaves in a node's /dev/shm are named on stderr before removal.
#
#   --rate RATE    link rate as tc writes it (500mbit, 1gbit, 10gbit, 2.5gbit...), or none (default 10gbit)
#   --name NAME    prefix of the namespaces and of the job's /dev/shm folder (default dpnet-emu-<pid>; [A-Za-z0-9_.-])
#   --script PATH  every process runs PYTHON PATH [args...] instead of PYTHON -m dpnet.train [args...]
#
# launch/emulate.sh --remove NAME removes what the cluster NAME left if this script itself was killed (SIGKILL).
#
# Across nodes UCX_TLS=tcp,self unless UCX_TLS is set (UCX would otherwise find the other "machines" through shared
# memory: one kernel). BLAS threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set, else max(1, cores / processes):
# the nodes share this machine's cores. Every process sees DPNET_EMULATED_CLUSTER=NAME. PYTHON and MPIEXEC as for
# local.sh. Exit code: the job's (2 for bad arguments, 1 when root or a tool is missing, 128+n after signal n).
# See launch/README.md.
set -euo pipefail

SUBNET=10.213.0     # the nodes' addresses, 10.213.0.1 ... (inside the namespaces only)
MAX_NODES=64

# ----------------------------------------------------------------------------------- Hydra's launcher (internal)
# mpiexec calls `LAUNCHER HOST COMMAND` (rsh's convention: COMMAND is shell text) for every node but its own. The
# launcher runs in node0's namespaces: it enters the launching script's mount namespace (where the job's /dev/shm
# folders are visible), then the node's.
if [[ ${1-} == --node-exec ]]; then
    host=$2
    shift 2
    name=${DPNET_EMULATED_CLUSTER:?--node-exec is for mpiexec inside launch/emulate.sh only}
    node=$(( ${host##*.} - 1 ))
    # shellcheck disable=SC2016  # $0, $1 and $2 are sh's, in single quotes on purpose
    exec nsenter --mount="/proc/$DPNET_EMULATE_LAUNCHER/ns/mnt" -- \
        ip netns exec "$name-node$node" unshare --uts --mount --propagation private \
        sh -c 'printf %s "$0" >/proc/sys/kernel/hostname && mount --bind "$1" /dev/shm && eval "exec $2"' \
        "node$node" "/dev/shm/$name/node$node" "$*"
fi

usage="usage: $0 NODES PROCS_PER_NODE [--rate RATE] [--name NAME] [--script PATH] [--] [dpnet.train arguments...]
       $0 --remove NAME   (what the cluster NAME left when this script itself was killed with SIGKILL)"
fail_usage() {
    echo "emulate.sh: $1" >&2
    echo "$usage" >&2
    exit 2
}
positive() { [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 >= 1 )); }
valid_name() {
    [[ $name =~ ^[A-Za-z0-9_.-]+$ && ${#name} -le 40 ]] || \
        fail_usage "--name must be 1 to 40 characters of A-Z a-z 0-9 _ . -, got '$name'"
}

remove=
if [[ ${1-} == --remove ]]; then
    [[ $# -eq 2 ]] || fail_usage "--remove takes the cluster's NAME, nothing else"
    remove=1 name=$2
    valid_name
    set --
fi
[[ -n $remove || $# -ge 2 ]] || fail_usage "NODES and PROCS_PER_NODE are required"
if [[ -z $remove ]]; then
    positive "$1" || fail_usage "NODES must be a positive integer, got '$1'"
    positive "$2" || fail_usage "PROCS_PER_NODE must be a positive integer, got '$2'"
    nodes=$((10#$1)) per_node=$((10#$2))
    (( nodes <= MAX_NODES )) || fail_usage "at most $MAX_NODES nodes, got $nodes"
    shift 2
    rate=10gbit name=dpnet-emu-$$ script=
    while [[ $# -gt 0 ]]; do
        case $1 in
            --rate|--name|--script)
                [[ $# -ge 2 ]] || fail_usage "$1 needs a value"
                declare "${1#--}=$2"
                shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    if [[ $rate != none ]]; then
        [[ $rate =~ ^([0-9]+(\.[0-9]+)?)([kmg]?)bit$ ]] || \
            fail_usage "--rate must be a rate as tc writes it (500mbit, 1gbit, 2.5gbit, 10gbit) or none, got '$rate'"
        number=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
        awk -v x="$number" 'BEGIN { exit !(x > 0) }' || fail_usage "--rate must be positive, got '$rate'"
        # tbf's bucket: 200 us at the rate, at least 128 KiB (a whole 64 KiB segment of the veth's offloads must fit)
        burst=$(awk -v x="$number" -v u="$unit" 'BEGIN {
            m = (u == "k") ? 1e3 : (u == "m") ? 1e6 : (u == "g") ? 1e9 : 1
            b = x * m / 8 * 2e-4; if (b < 131072) b = 131072; printf "%d", b }')
    fi
    valid_name
    if [[ -n $script && ! -r $script ]]; then
        fail_usage "--script: cannot read '$script'"
    fi
    [[ -z $script || $script == /* ]] || script=$PWD/$script
fi

# ----------------------------------------------------------------------------------- what it needs
if [[ $(id -u) -ne 0 ]]; then
    echo "emulate.sh: needs root (network, UTS and mount namespaces, tc): run it as root or with sudo" >&2
    exit 1
fi
for tool in ip tc unshare nsenter mount; do
    if ! command -v "$tool" >/dev/null; then
        package=iproute2
        [[ $tool == ip || $tool == tc ]] || package=util-linux
        echo "emulate.sh: '$tool' not found: install $package (Debian: apt-get install -y $package)" >&2
        exit 1
    fi
done
cluster_namespaces() {  # the namespaces of the cluster $name: NAME-switch, NAME-node0, NAME-node1...
    local ns
    while read -r ns _; do
        [[ $ns == "$name"-* && ${ns#"$name"-} =~ ^(switch|node[0-9]+)$ ]] && echo "$ns"
    done < <(ip netns list)
    return 0
}
if [[ -z $remove ]] && [[ -n $(cluster_namespaces) || -e /dev/shm/$name ]]; then
    echo "emulate.sh: namespaces $name-* or /dev/shm/$name exist already (ip netns list): choose another --name," \
         "or remove them with --remove $name" >&2
    exit 1
fi
if [[ -z $remove ]]; then
    # shellcheck source=launch/find_mpi.sh
    source "$(dirname "${BASH_SOURCE[0]}")/find_mpi.sh"
    find_mpi emulate.sh
    if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi\|openrte"; then
        echo "emulate.sh: needs MPICH's mpiexec (Hydra), got Open MPI's $MPIEXEC: pip install dpnet[mpi]," \
             "or set MPIEXEC" >&2
        exit 1
    fi
fi
self=$(readlink -f "$0")

# ----------------------------------------------------------------------------------- removal, on every way out
shm=/dev/shm/$name
made=()            # namespaces made, in order
job=               # mpiexec's pid while it runs
signalled=
tmp=

# shellcheck disable=SC2317  # run by the traps
cleanup() {
    trap - EXIT INT TERM HUP
    set +e
    local ns pids left
    for ns in "${made[@]}"; do      # nothing should be left: a job's processes all end with mpiexec
        mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
        if (( ${#pids[@]} > 0 )); then
            [[ -n $signalled ]] || echo "emulate.sh: killing processes left in $ns: ${pids[*]}" >&2
            kill -KILL "${pids[@]}" 2>/dev/null
        fi
    done
    for ns in "${made[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do   # a killed process leaves its namespace when it is reaped
            [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break
            sleep 0.1
        done
        ip netns delete "$ns" 2>/dev/null || echo "emulate.sh: could not delete the namespace $ns" >&2
    done
    if [[ -d $shm ]]; then
        left=$(cd "$shm" && find . -mindepth 2 -printf '%P ' 2>/dev/null)
        [[ -z $left ]] || echo "emulate.sh: the job left files in its nodes' /dev/shm (removed): $left" >&2
        rm -rf "$shm"
    fi
    [[ -z $tmp ]] || rm -rf "$tmp"
}

# shellcheck disable=SC2317  # run by the traps
on_signal() {
    signalled=$1
    [[ -n $job ]] || exit $(( 128 + $(kill -l "$1") ))   # still setting up: remove what was made and stop
    # mpiexec ends the job on SIGINT and SIGTERM (dpnet's ranks abort together); whatever remains is killed after
    kill -s "$1" "$job" 2>/dev/null || true
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

if [[ -n $remove ]]; then
    mapfile -t made < <(cluster_namespaces)
    scripts=()
    for folder in "${TMPDIR:-/tmp}/$name".??????; do   # mktemp's folders holding the launcher script, nothing else
        [[ -d $folder && ! -L $folder && $(ls -A "$folder") == rsh ]] && scripts+=("$folder")
    done
    if (( ${#made[@]} + ${#scripts[@]} == 0 )) && [[ ! -e $shm ]]; then
        echo "emulate.sh: nothing of a cluster $name to remove (ip netns list, /dev/shm/$name)" >&2
    fi
    (( ${#scripts[@]} == 0 )) || rm -rf "${scripts[@]}"
    exit 0  # cleanup (the EXIT trap) kills what runs in the namespaces and removes them
fi

# ----------------------------------------------------------------------------------- the cluster
run() {  # run a setup command; a failure names it and ends the script (cleanup removes what was made)
    "$@" || { echo "emulate.sh: failed: $*" >&2; exit 1; }
}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/$name.XXXXXX")  # Hydra's launcher script (found by --remove too)
mkdir -m 0755 "$shm"
if (( nodes > 1 )); then
    run ip netns add "$name-switch"
    made+=("$name-switch")
    run ip -n "$name-switch" link add br0 type bridge
    run ip -n "$name-switch" link set br0 up
fi
hosts=()
for (( k = 0; k < nodes; k++ )); do
    ns=$name-node$k
    run ip netns add "$ns"
    made+=("$ns")
    mkdir -m 1777 "$shm/node$k"
    run ip -n "$ns" link set lo up
    hosts+=("$SUBNET.$((k + 1)):$per_node")
    if (( nodes == 1 )); then   # no link; the address (on lo) is what mpiexec recognizes as its own host
        run ip -n "$ns" addr add "$SUBNET.1/32" dev lo
        continue
    fi
    # the veth pair is made inside the namespaces: this machine's own interfaces never change
    run ip link add eth0 netns "$ns" type veth peer name "port$k" netns "$name-switch"
    run ip -n "$ns" addr add "$SUBNET.$((k + 1))/24" dev eth0
    run ip -n "$ns" link set eth0 up
    run ip -n "$name-switch" link set "port$k" master br0 up
    if [[ $rate != none ]]; then
        run tc -n "$ns" qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 100ms
        run tc -n "$name-switch" qdisc add dev "port$k" root tbf rate "$rate" burst "$burst" latency 100ms
    fi
done
printf '#!/bin/sh\nexec %q --node-exec "$@"\n' "$self" >"$tmp/rsh"
chmod +x "$tmp/rsh"

# ----------------------------------------------------------------------------------- the job
processes=$(( nodes * per_node ))
cores=$(nproc)
threads=${OPENBLAS_NUM_THREADS:-${OMP_NUM_THREADS:-$(( cores / processes > 1 ? cores / processes : 1 ))}}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
export DPNET_EMULATED_CLUSTER=$name DPNET_EMULATE_LAUNCHER=$$
if (( nodes > 1 )) && [[ -z ${UCX_TLS+set} ]]; then
    export UCX_TLS=tcp,self
fi
hostlist=$(IFS=,; echo "${hosts[*]}")
if [[ -n $script ]]; then
    program=("$PYTHON" "$script")
else
    program=("$PYTHON" -m dpnet.train)
fi
command=("$MPIEXEC" -launcher rsh -launcher-exec "$tmp/rsh" -hosts "$hostlist" -n "$processes" "${program[@]}" "$@")
links=${rate/none/unlimited}
(( nodes > 1 )) || links="none (one node)"
echo "emulate.sh: $nodes nodes x $per_node processes, links $links, BLAS threads per process" \
     "$threads${UCX_TLS:+, UCX_TLS=$UCX_TLS}: ${command[*]}" >&2
# shellcheck disable=SC2016  # $0, $1 and $@ are sh's
ip netns exec "$name-node0" unshare --uts --mount --propagation private \
    sh -c 'printf %s "$0" >/proc/sys/kernel/hostname && mount --bind "$1" /dev/shm && shift && exec "$@"' \
    node0 "$shm/node0" "${command[@]}" &
job=$!
status=0
wait "$job" || status=$?
if [[ -n $signalled ]]; then   # wait returned for the signal: give mpiexec 10 s to end the job
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$job" 2>/dev/null || break
        sleep 0.1
    done
    status=$(( 128 + $(kill -l "$signalled") ))
fi
job=
exit "$status"
