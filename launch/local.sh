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

# mpiexec starts whatever "python" its own PATH finds first; an absolute path makes it this one. Symlinks are kept
# as they are: a virtualenv's bin/python is a symlink, and resolving it would leave the virtualenv.
PYTHON=${PYTHON:-$(command -v python3 || true)}
if [[ -z $PYTHON ]]; then
    echo "local.sh: no python3 on PATH; set PYTHON=/absolute/path/to/python" >&2
    exit 1
fi
[[ $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON
if [[ -z ${MPIEXEC-} ]]; then
    if [[ -x $(dirname "$PYTHON")/mpiexec ]]; then
        MPIEXEC=$(dirname "$PYTHON")/mpiexec  # the mpich wheel's, installed with pip install dpnet[mpi]
    else
        MPIEXEC=$(command -v mpiexec || true)
    fi
fi
if [[ -z $MPIEXEC ]]; then
    echo "local.sh: no mpiexec next to $PYTHON nor on PATH: pip install dpnet[mpi], or set MPIEXEC" >&2
    exit 1
fi

cores=$(nproc)
threads=${OPENBLAS_NUM_THREADS:-${OMP_NUM_THREADS:-$(( cores / n > 1 ? cores / n : 1 ))}}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads

echo "local.sh: $n processes x $threads BLAS threads on $cores cores: $MPIEXEC -n $n $PYTHON -m dpnet.train $*" >&2
exec "$MPIEXEC" -n "$n" "$PYTHON" -m dpnet.train "$@"
