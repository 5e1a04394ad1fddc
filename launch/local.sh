#!/usr/bin/env bash
# Train with N processes on this machine: launch/local.sh N [dpnet.train arguments...]
#
# Each process gets max(1, cores / N) BLAS threads, unless OMP_NUM_THREADS or OPENBLAS_NUM_THREADS is already set.
# PYTHON (default: the python3 first on PATH) and MPIEXEC (default: the mpiexec next to PYTHON, else the one on
# PATH) may be set to choose others. See launch/README.md.
set -euo pipefail

usage="usage: $0 N [dpnet.train arguments...]   (N = number of processes, a positive integer)"
if [[ $# -lt 1 || ! ${1} =~ ^[0-9]+$ ]] || (( 10#$1 < 1 )); then
    echo "local.sh: the number of processes N must be a positive integer, got '${1-}'" >&2
    echo "$usage" >&2
    exit 2
fi
n=$((10#$1))
shift

# shellcheck source=launch/find_mpi.sh
source "$(dirname "${BASH_SOURCE[0]}")/find_mpi.sh"
find_mpi local.sh

cores=$(nproc)
threads=${OPENBLAS_NUM_THREADS:-${OMP_NUM_THREADS:-$(( cores / n > 1 ? cores / n : 1 ))}}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads

echo "local.sh: $n processes x $threads BLAS threads on $cores cores: $MPIEXEC -n $n $PYTHON -m dpnet.train $*" >&2
exec "$MPIEXEC" -n "$n" "$PYTHON" -m dpnet.train "$@"
