# Sourced by local.sh, hosts.sh and emulate.sh (slurm.sbatch keeps its own copy: sbatch runs a copy of the script,
# away from this folder). find_mpi PROG sets PYTHON and MPIEXEC, or prints what is missing and exits 1.
#
# mpiexec starts whatever "python" its own PATH finds first; an absolute path makes it this one. Symlinks are kept
# as they are: a virtualenv's bin/python is a symlink, and resolving it would leave the virtualenv.
find_mpi() {
    local prog=$1
    PYTHON=${PYTHON:-$(command -v python3 || true)}
    if [[ -z $PYTHON ]]; then
        echo "$prog: no python3 on PATH; set PYTHON=/absolute/path/to/python" >&2
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
        echo "$prog: no mpiexec next to $PYTHON nor on PATH: pip install dpnet[mpi], or set MPIEXEC" >&2
        exit 1
    fi
}
