#!/usr/bin/env bash
# Train with N processes spread over the machines of a hostfile: launch/hosts.sh HOSTFILE N [dpnet.train args...]
#
# Needs passwordless ssh to every host, and the same PYTHON path (same virtualenv, same repository) on each of them.
# BLAS threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set here (passed to every process); otherwise each process
# takes cores-of-its-machine / processes-on-its-machine (dpnet reads the launcher's local process count).
# PYTHON and MPIEXEC may be set as for local.sh. See launch/README.md.
set -euo pipefail

usage="usage: $0 HOSTFILE N [dpnet.train arguments...]   (N = number of processes, a positive integer)"
if [[ $# -lt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
hostfile=$1
if [[ ! -r $hostfile ]]; then
    echo "hosts.sh: cannot read the hostfile '$hostfile' (see launch/hostfile.example)" >&2
    exit 2
fi
if [[ ! ${2} =~ ^[0-9]+$ ]] || (( 10#$2 < 1 )); then
    echo "hosts.sh: the number of processes N must be a positive integer, got '$2'" >&2
    echo "$usage" >&2
    exit 2
fi
n=$((10#$2))
shift 2

# shellcheck source=launch/find_mpi.sh
source "$(dirname "${BASH_SOURCE[0]}")/find_mpi.sh"
find_mpi hosts.sh

# MPICH's Hydra passes the whole environment to every process; Open MPI's mpirun passes only what -x names.
args=()
if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi\|openrte"; then
    args+=(--hostfile "$hostfile" -np "$n")
    for var in OMP_NUM_THREADS OPENBLAS_NUM_THREADS DPNET_BLAS_THREADS PYTHONPATH; do
        if [[ -n ${!var-} ]]; then args+=(-x "$var"); fi
    done
else
    args+=(-f "$hostfile" -n "$n")
fi

echo "hosts.sh: $MPIEXEC ${args[*]} $PYTHON -m dpnet.train $*" >&2
exec "$MPIEXEC" "${args[@]}" "$PYTHON" -m dpnet.train "$@"
