"""What a data-parallel process learns from, and sets in, its environment: the launcher's process counts, BLAS
threads per process, UCX's transports, and the room and the job's files in /dev/shm.

Environment variables read:
- PMI_SIZE, OMPI_COMM_WORLD_SIZE, SLURM_STEP_NUM_TASKS, PMIX_RANK: whether an MPI launcher started this process.
- MPI_LOCALNRANKS, OMPI_COMM_WORLD_LOCAL_SIZE: processes on this machine.
- DPNET_BLAS_THREADS, else OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS: BLAS threads per process.
- UCX_TLS: set to "^sm" before MPI starts, unless set already, when Hydra started every process on this machine.
"""

import os
import sys

# Launcher variables giving the number of processes started: MPICH/Hydra (PMI_SIZE, PMI_RANK, MPI_LOCALNRANKS,
# MPI_LOCALRANKID), Slurm's PMI-2 plugin, Open MPI, srun.
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
THREAD_VARS = ("DPNET_BLAS_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
SHM_DIR = "/dev/shm"
_JOB_FILE_PREFIXES = (f" {SHM_DIR}/mpich_shm_", f" {SHM_DIR}/dpnet-copy-")  # as /proc/self/maps shows them

_blas_limits = None  # the threadpoolctl controller; kept alive for the life of the process


def warn(message):
    """Write `message` to stderr and flush; never raises (a closed stream must not turn a note into a failure)."""
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
    except Exception:
        pass


def launched_size():
    """(launched, size): whether an MPI launcher started this process, and how many processes (None: not said)."""
    for var in WORLD_SIZE_VARS:
        if os.environ.get(var):
            return True, int(os.environ[var])
    if os.environ.get("PMIX_RANK"):  # PMIx gives the rank but not the size
        return True, None
    return False, 1


def skip_ucx_shared_memory():
    """Before MPI starts, when Hydra (the mpiexec of MPICH and its wheel) started every process on this machine: unless
    the user set UCX_TLS, tell UCX to open no shared-memory transport (UCX_TLS=^sm).

    MPICH carries the messages between processes of one machine through its own shared memory, never through its
    network module; UCX's shared-memory transports would only map FIFOs in every process for nothing. Other launchers
    (Open MPI's mpirun, whose UCX layer does carry a machine's messages; srun) are left alone."""
    local, world = os.environ.get("MPI_LOCALNRANKS"), os.environ.get("PMI_SIZE")
    if local and local == world and "UCX_TLS" not in os.environ and "mpi4py.MPI" not in sys.modules:
        os.environ["UCX_TLS"] = "^sm"


def positive_int(value, name):
    """int(value) (the first field of a comma list such as OMP_NUM_THREADS="4,2"); ValueError naming `name` unless
    it is a positive integer."""
    try:
        n = int(str(value).split(",")[0])
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def processes_on_this_node(comm=None):
    """Processes of this job on this machine: from the launcher, else comm.local_size() (collective), else 1."""
    for var in LOCAL_SIZE_VARS:
        if os.environ.get(var):
            return positive_int(os.environ[var], var)
    if comm is not None and comm.size > 1:
        return comm.local_size()
    return 1


def usable_cores():
    """The CPUs this process may run on (its affinity mask where there is one, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def requested_blas_threads(n=None):
    """(threads, where they come from) as asked for: n (source "the argument"), else the first of THREAD_VARS that
    is set (source its name), else (None, None). Not collective, creates nothing; ValueError naming the source unless
    the number is a positive integer."""
    if n is not None:
        return positive_int(n, "the number of BLAS threads"), "the argument"
    var = next((v for v in THREAD_VARS if os.environ.get(v)), None)
    if var is None:
        return None, None
    return positive_int(os.environ[var], var), var


def set_blas_threads(n=None, comm=None):
    """Limit the BLAS thread pool of this process to n threads (via threadpoolctl) and return n.

    n None: $DPNET_BLAS_THREADS, else $OPENBLAS_NUM_THREADS, else $OMP_NUM_THREADS, else
    max(1, cores // processes on this machine), cores being the CPUs this process may run on (see
    processes_on_this_node; with `comm` it is collective: call it on every rank). Oversubscribed cores (P processes
    each running a pool of #cores threads) make every step several times slower. A launcher that pins each process to
    its own cores (srun --cpus-per-task) gives one process its CPUs only: set OMP_NUM_THREADS there.
    """
    global _blas_limits
    n, _ = requested_blas_threads(n)
    if n is None:
        n = max(1, usable_cores() // processes_on_this_node(comm))
    from threadpoolctl import threadpool_limits

    _blas_limits = threadpool_limits(limits=n, user_api="blas")
    return n


def shared_memory_room():
    """Free bytes of the shared-memory file system MPICH maps its windows from (None where there is none)."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def job_shared_memory_files():
    """The files of /dev/shm, still linked, that this process maps and that belong to its job: MPICH's segment of the
    processes on this machine (MPI_Finalize removes it) and a dpnet-copy file of bcast_copy_on_write between its
    mapping and its unlinking. Empty where there is no /proc."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split(None, 5)[5].rstrip("\n") for line in maps
                     if any(prefix in line for prefix in _JOB_FILE_PREFIXES)]
    except OSError:
        return set()
    return {path for path in lines if not path.endswith(" (deleted)")}


def unlink_job_shared_memory_files():
    """Unlink job_shared_memory_files(). MPI_Abort kills the processes before MPI_Finalize can: without this, every
    aborted job would leave its segment in /dev/shm for good. The processes that map the files keep their mappings
    until they exit."""
    for path in job_shared_memory_files():
        try:
            os.unlink(path)
        except OSError:
            pass
