"""Communicators: how processes of a data-parallel job talk to each other.

A communicator has `rank`, `size`, `is_root`, `allreduce(buf, op="sum")` and `bcast(buf, root=0)` (both in place on a
contiguous NumPy array, returning it), the block collectives `reduce_scatter`, `allgather` and `gather` (1-D buffers cut
into one block per process, see `block_counts`), `barrier()`, `abort(code=1)`, `local_size()` (processes on this
machine) and `shared_array(size, dtype)` (one array in memory that all processes map, when they are on one machine:
`NodeSharedArray`; None otherwise).
`SerialCommunicator` is the single process (size 1, never imports mpi4py); `MPICommunicator` wraps mpi4py's buffer
calls (`Allreduce(MPI.IN_PLACE, ...)`, `Bcast`), so no object is ever pickled. `get_communicator()` picks the MPI world
when an MPI launcher started more than one process, else the serial one. `FusedBuffer` lays several arrays (the
gradients) out in one reusable buffer so that one collective moves them all.

An MPI job must not hang when one rank fails: creating an `MPICommunicator` of size > 1 installs
`install_abort_handler`, which turns an unhandled exception, SIGINT or SIGTERM on any rank into one message on stderr
and `MPI_Abort` of the whole job (as `python -m mpi4py` does, without the user having to remember it).

Environment variables:
- DPNET_BLAS_THREADS=N: BLAS threads per process for `set_blas_threads` (else OPENBLAS_NUM_THREADS, OMP_NUM_THREADS,
  else cores / processes on this machine).
- DPNET_FAULT_INJECT="rank=R,step=S" (testing only): `fault_injection_point(comm, S)` raises RuntimeError on rank R.
  Both keys are required integers; spaces are allowed around them.
- UCX_TLS: set to "^sm" before MPI starts, unless set already, when Hydra started every process on this machine (see
  `_skip_ucx_shared_memory`).
"""

import collections
import functools
import hashlib
import os
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

OPS = ("sum", "max", "min")

# Launcher variables giving the number of processes started: MPICH/Hydra (verified with the mpich wheel's mpiexec, which
# sets PMI_SIZE, PMI_RANK, MPI_LOCALNRANKS, MPI_LOCALRANKID) and Slurm's PMI-2 plugin; Open MPI; srun.
_WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
_THREAD_VARS = ("DPNET_BLAS_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
FAULT_ENV = "DPNET_FAULT_INJECT"


def _check_buffer(buf, op="sum"):
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"communicator buffers must be NumPy arrays, got {type(buf).__name__}")
    if not (buf.flags.c_contiguous or buf.flags.f_contiguous):
        raise ValueError(f"communicator buffers must be contiguous, got a strided array of shape {buf.shape}: "
                         "reduce np.ascontiguousarray(buf) and copy the result back")
    if not buf.flags.writeable:
        raise ValueError("communicator buffers are updated in place, got a read-only array")
    if buf.dtype.hasobject:
        raise TypeError("communicator buffers must hold numbers, got an object array")
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {', '.join(OPS)}")


def _check_blocks(buf, counts, size):
    _check_buffer(buf)
    if len(counts) != size or any(c < 0 for c in counts) or buf.ndim != 1 or buf.size != sum(counts):
        raise ValueError(f"expected a 1-D buffer of sum(counts) elements and one count per process ({size}), got "
                         f"shape {buf.shape} and counts {list(counts)}")


def _displacements(counts):
    return [int(d) for d in np.cumsum([0, *counts[:-1]])]


def block_counts(n, size):
    """n elements cut into `size` contiguous blocks whose sizes differ by at most one (the first ones smaller)."""
    return [(r + 1) * n // size - r * n // size for r in range(size)]


class SerialCommunicator:
    """The single process: size 1, every collective is a (checked) no-op."""

    rank = 0
    size = 1
    is_root = True

    def allreduce(self, buf, op="sum"):
        _check_buffer(buf, op)
        return buf

    def bcast(self, buf, root=0):
        _check_buffer(buf)
        if root != 0:
            raise ValueError(f"root must be 0 in a single process, got {root}")
        return buf

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        """See MPICommunicator.reduce_scatter: with one process, block 0 is the whole sum."""
        _check_blocks(sendbuf, counts, self.size)
        _check_buffer(recvbuf)
        recvbuf[...] = sendbuf
        return recvbuf

    def allgather(self, buf, counts):
        """See MPICommunicator.allgather: with one process there is nothing to gather."""
        _check_blocks(buf, counts, self.size)
        return buf

    def gather(self, sendbuf, recvbuf, counts, root=0):
        """See MPICommunicator.gather."""
        _check_buffer(sendbuf)
        if recvbuf is not None:
            _check_blocks(recvbuf, counts, self.size)
            recvbuf[...] = sendbuf
        return recvbuf

    def barrier(self):
        pass

    def local_size(self):
        return 1

    def shared_array(self, size, dtype, each=False):
        """None: one process has nobody to share memory with (see MPICommunicator.shared_array)."""
        return None

    def abort(self, code=1):
        """End the process now with exit code `code` (no cleanup; standard streams are flushed)."""
        _flush_std_streams()
        os._exit(code)


class MPICommunicator:
    """A communicator over mpi4py (default: MPI.COMM_WORLD). Buffers are NumPy arrays reduced in place."""

    def __init__(self, comm=None):
        _skip_ucx_shared_memory()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("dpnet's MPI communicator needs mpi4py and an MPI library: pip install dpnet[mpi] "
                              "(or pip install mpi4py built against your system MPI)") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._local_size = None
        if self.size > 1:
            install_abort_handler(self)

    def allreduce(self, buf, op="sum"):
        """Element-wise reduce `buf` over all processes, in place; every process gets the result. Returns buf."""
        _check_buffer(buf, op)
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[op])
        return buf

    def bcast(self, buf, root=0):
        """Overwrite `buf` on every process with root's `buf` (same shape and dtype everywhere). Returns buf."""
        _check_buffer(buf)
        self.comm.Bcast(buf, root=root)
        return buf

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        """Sum the 1-D `sendbuf` over all processes, block by block: block r (counts[r] elements, the blocks back to
        back in rank order) of the sum lands in process r's `recvbuf` (counts[rank] elements). Returns recvbuf."""
        _check_blocks(sendbuf, counts, self.size)
        _check_buffer(recvbuf)
        if recvbuf.size != counts[self.rank]:
            raise ValueError(f"recvbuf has {recvbuf.size} elements, block {self.rank} has {counts[self.rank]}")
        if len(set(counts)) == 1:  # equal blocks: the block variant is the faster one in MPICH
            self.comm.Reduce_scatter_block(sendbuf, recvbuf, op=self._MPI.SUM)
        else:
            self.comm.Reduce_scatter(sendbuf, recvbuf, recvcounts=list(counts), op=self._MPI.SUM)
        return recvbuf

    def allgather(self, buf, counts):
        """In place on the 1-D `buf`: block r (counts[r] elements, back to back in rank order) is process r's; every
        process ends with all blocks. Returns buf."""
        _check_blocks(buf, counts, self.size)
        if len(set(counts)) == 1:  # equal blocks: Allgather is twice as fast as Allgatherv here (MPICH, 7 MB)
            self.comm.Allgather(self._MPI.IN_PLACE, buf)
        else:
            self.comm.Allgatherv(self._MPI.IN_PLACE, [buf, (list(counts), _displacements(counts))])
        return buf

    def gather(self, sendbuf, recvbuf, counts, root=0):
        """Process r's 1-D `sendbuf` (counts[r] elements) becomes block r of root's `recvbuf` (sum(counts) elements;
        None on the other processes). Returns recvbuf."""
        _check_buffer(sendbuf)
        if sendbuf.size != counts[self.rank]:
            raise ValueError(f"sendbuf has {sendbuf.size} elements, block {self.rank} has {counts[self.rank]}")
        if self.rank == root:
            _check_blocks(recvbuf, counts, self.size)
            self.comm.Gatherv(sendbuf, [recvbuf, (list(counts), _displacements(counts))], root=root)
        else:
            self.comm.Gatherv(sendbuf, None, root=root)
        return recvbuf

    def barrier(self):
        self.comm.Barrier()

    def local_size(self):
        """Number of processes of this communicator on this machine (collective on the first call, then cached)."""
        if self._local_size is None:
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
            self._local_size = node.Get_size()
            node.Free()
        return self._local_size

    def shared_array(self, size, dtype, each=False):
        """Collective: a NodeSharedArray of `size` elements of `dtype` that every process of this communicator maps
        (with `each`, one such array per process), when they all run on one machine; None when they do not, or when
        the shared-memory file system (MPICH's: /dev/shm) has not room for it besides what this job's live shared
        arrays may still fill (a note on stderr says so): a process touching shared pages beyond the file system's
        size would die of SIGBUS."""
        MPI = self._MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        itemsize = np.dtype(dtype).itemsize
        needed = size * itemsize * (self.size if each else 1)
        room = _shared_memory_room() if self.rank == 0 else None
        room = self.comm.bcast(room, root=0)  # one decision for all (once per training run: pickling is fine)
        if room is not None:  # tmpfs counts pages once written: the live arrays' untouched pages are spoken for
            room -= NodeSharedArray.live_bytes
        if node.Get_size() != self.size or (room is not None and room < needed):
            if node.Get_size() == self.size and self.rank == 0:
                _say(f"dpnet: {_SHM_DIR} has {room / 2**20:.0f} MB free, {needed / 2**20:.0f} MB are needed to "
                     "share parameters and gradients between processes: they are copied through MPI instead "
                     "(make /dev/shm larger, e.g. docker run --shm-size, for the faster way)\n")
            node.Free()
            return None
        window = MPI.Win.Allocate_shared(size * itemsize if each or node.Get_rank() == 0 else 0, itemsize, comm=node)
        window.Lock_all(MPI.MODE_NOCHECK)  # a passive-target epoch, for Win_sync (memory barriers); no lock is taken
        arrays = [np.frombuffer(window.Shared_query(rank)[0], dtype=dtype, count=size)
                  for rank in (range(self.size) if each else [0])]
        return NodeSharedArray(arrays, self.rank if each else 0, window, node, needed)

    def abort(self, code=1):
        """End every process of the job (MPI_COMM_WORLD) with exit code `code`; does not return."""
        _flush_std_streams()
        _unlink_job_shared_memory_files()
        time.sleep(0.2)  # let the launcher forward what this process just wrote: an aborted job's unread output is lost
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # MPICH's MPI_Abort can return before the process manager's kill arrives: never run on


def _skip_ucx_shared_memory():
    """Before MPI starts, when Hydra (the mpiexec of MPICH and its wheel) started every process on this machine: unless
    the user set UCX_TLS, tell UCX to open no shared-memory transport (UCX_TLS=^sm).

    MPICH carries the messages between processes of one machine through its own shared memory, never through its
    network module; UCX's shared-memory transports (the wheel's default network module is UCX) would only map 4 MB of
    FIFOs per process, a tenth of what a process adds to a job (python -m dpnet.bench --sections memory). Other
    launchers (Open MPI's mpirun, whose UCX layer does carry a machine's messages; srun) are left alone."""
    local, world = os.environ.get("MPI_LOCALNRANKS"), os.environ.get("PMI_SIZE")
    if local and local == world and "UCX_TLS" not in os.environ and "mpi4py.MPI" not in sys.modules:
        os.environ["UCX_TLS"] = "^sm"


def _launched_size():
    """(launched, size): whether an MPI launcher started this process, and how many processes (None: not said)."""
    for var in _WORLD_SIZE_VARS:
        if os.environ.get(var):
            return True, int(os.environ[var])
    if os.environ.get("PMIX_RANK"):  # PMIx gives the rank but not the size
        return True, None
    return False, 1


def get_communicator(kind=None):
    """The communicator of this process.

    kind None or "auto": the MPI world if an MPI launcher (mpiexec/mpirun, srun) started more than one process, judged
    from the launcher's environment variables so that mpi4py is not even imported otherwise; else serial.
    "serial" or "mpi" force a kind. Raises ImportError (saying `pip install dpnet[mpi]`) when MPI is needed but mpi4py
    is missing, and RuntimeError when the launcher started N processes but MPI sees another number (e.g. srun without
    --mpi=pmi2/pmix starts N independent single processes).
    """
    if kind == "serial":
        return SerialCommunicator()
    if kind == "mpi":
        return MPICommunicator()
    if kind not in (None, "auto"):
        raise ValueError(f"unknown communicator kind {kind!r}; expected 'auto', 'serial' or 'mpi'")
    launched, size = _launched_size()
    if not launched or size == 1:
        return SerialCommunicator()
    comm = MPICommunicator()
    if size is not None and comm.size != size:
        raise RuntimeError(f"the launcher started {size} processes but MPI sees {comm.size}: mpi4py is not using the "
                           "launcher's MPI (with Slurm use srun --mpi=pmi2 or pmix, or the mpiexec of the MPI that "
                           "mpi4py was built with)")
    return comm if comm.size > 1 else SerialCommunicator()


# ----------------------------------------------------------------------------------------------- BLAS threads
_blas_limits = None  # the threadpoolctl controller; kept alive for the life of the process


def _positive_int(value, name):
    try:
        n = int(str(value).split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,2"
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _processes_on_this_node(comm):
    for var in _LOCAL_SIZE_VARS:
        if os.environ.get(var):
            return _positive_int(os.environ[var], var)
    if comm is not None and comm.size > 1:
        return comm.local_size()
    return 1


def set_blas_threads(n=None, comm=None):
    """Limit the BLAS thread pool of this process to n threads (via threadpoolctl) and return n.

    n None: $DPNET_BLAS_THREADS, else $OPENBLAS_NUM_THREADS, else $OMP_NUM_THREADS, else
    max(1, cores // processes on this machine), cores being the CPUs this process may run on and the process count
    coming from the launcher (MPI_LOCALNRANKS, OMPI_COMM_WORLD_LOCAL_SIZE) or from `comm.local_size()` (collective:
    call it on every rank). Oversubscribing the cores (each of P processes running a pool of #cores threads) makes
    every step several times slower. A launcher that pins each process to its own cores (srun --cpus-per-task) gives
    one process its CPUs only: set OMP_NUM_THREADS there (launch/slurm.sbatch does).
    """
    global _blas_limits
    if n is None:
        var = next((v for v in _THREAD_VARS if os.environ.get(v)), None)
        if var is not None:
            n = _positive_int(os.environ[var], var)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            n = max(1, cores // _processes_on_this_node(comm))
    n = _positive_int(n, "the number of BLAS threads")
    from threadpoolctl import threadpool_limits

    _blas_limits = threadpool_limits(limits=n, user_api="blas")
    return n


# ----------------------------------------------------------------------------------------------- failures
_abort_handler_installed = False
_signal_sockets = None  # kept alive: CPython writes caught signal numbers into the second one


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not prevent the abort
            pass


def _say(message):
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
    except Exception:
        pass


def install_abort_handler(comm):
    """Make any rank's failure end the whole job instead of leaving the other ranks blocked in a collective.

    An unhandled exception (sys.excepthook) prints one message naming the rank, with the traceback, then calls
    comm.abort(1). SIGINT or SIGTERM (when installed from the main thread) print a message and comm.abort(128 + signal).
    Idempotent. Signals are served by a watcher thread woken through signal.set_wakeup_fd, because a Python signal
    handler only runs when the main thread returns to the interpreter, never while it waits inside MPI_Allreduce; the
    thread calls MPI_Abort concurrently with the main thread, which mpi4py's default thread level (MPI_THREAD_MULTIPLE,
    mpi4py.rc.thread_level) permits. Skipped if something else (an event loop) already owns the wakeup fd.
    """
    global _abort_handler_installed
    if _abort_handler_installed:
        return
    _abort_handler_installed = True
    who = f"rank {comm.rank} of {comm.size}"

    def excepthook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        _say(f"dpnet: {who} failed with an unhandled {exc_type.__name__}; aborting all ranks\n{text}")
        comm.abort(1)

    sys.excepthook = excepthook
    if threading.current_thread() is threading.main_thread():
        _abort_on_signals(comm, who)


def _abort_on_signals(comm, who):
    global _signal_sockets
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    if previous != -1:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return
    _signal_sockets = (reader, writer)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # CPython writes to the wakeup fd only for signals that have a Python handler; the watcher does the work.
        signal.signal(sig, lambda signum, frame: None)

    def watch():
        signum = reader.recv(1)[0]
        _say(f"dpnet: {who} received {signal.Signals(signum).name}; aborting all ranks\n")
        comm.abort(128 + signum)

    threading.Thread(target=watch, name="dpnet-abort-on-signal", daemon=True).start()


@functools.lru_cache(maxsize=8)
def _parse_fault(value):
    if not value:
        return None
    try:
        fields = dict(item.split("=") for item in value.replace(" ", "").split(","))
        spec = int(fields.pop("rank")), int(fields.pop("step"))
    except (ValueError, KeyError):
        fields, spec = None, None
    if spec is None or fields:
        raise ValueError(f'{FAULT_ENV}={value!r}: expected "rank=R,step=S" with integers R and S')
    return spec


def fault_injection_point(comm, step):
    """Raise RuntimeError("injected fault ...") if $DPNET_FAULT_INJECT names this rank and `step` (tests only).

    `step` is whatever the caller counts (the Solver passes its iteration counter before the update). The variable is
    parsed once per distinct value, so an unset variable costs one dictionary lookup.
    """
    spec = _parse_fault(os.environ.get(FAULT_ENV))
    if spec is not None and spec == (comm.rank, step):
        raise RuntimeError(f"injected fault on rank {comm.rank} at step {step} ({FAULT_ENV}={os.environ[FAULT_ENV]})")


# ----------------------------------------------------------------------------------------------- helpers
def make_reducer(comm):
    """A callable reduce_sum(a) -> new C-contiguous array (a's dtype) holding the element-wise sum of `a` over all
    processes, for synchronized batch normalization; None when comm has one process (local statistics are global)."""
    if comm.size == 1:
        return None

    def reduce_sum(a):
        return comm.allreduce(np.array(a, order="C", copy=True))

    return reduce_sum


reducer = make_reducer  # the name used in the original specification


class FusedBuffer:
    """Several arrays laid out back to back in one contiguous buffer (plus `extra` scalar slots), so that one
    collective moves them all: allocated once, then reused every step.

    Build it from a dict of arrays (name -> ndarray; the buffer has their common dtype), in a new buffer or in the given
    1-D `buffer` (of that dtype and size: say, a NodeSharedArray's). `views[name]` is a view of the buffer shaped like
    arrays[name], starting at `offsets[name]`; `extra` is the view of the trailing slots and `body` of everything before
    them;
    `pack(arrays, scale)` writes scale * arrays into the buffer (the only copy), unless the arrays already are the
    views (a model that wrote its gradients into them), which are then scaled in place; after a collective on `buffer`
    the views hold the results.
    """

    def __init__(self, arrays, extra=0, buffer=None):
        names = sorted(arrays)
        self.shapes = {name: np.shape(arrays[name]) for name in names}
        sizes = [int(np.prod(shape)) for shape in self.shapes.values()]
        dtype = np.result_type(*(arrays[name].dtype for name in names))
        if buffer is None:
            buffer = np.empty(sum(sizes) + extra, dtype=dtype)
        elif buffer.shape != (sum(sizes) + extra,) or buffer.dtype != dtype:
            raise ValueError(f"buffer must be a 1-D {dtype} array of {sum(sizes) + extra} elements, got "
                             f"{buffer.dtype} {buffer.shape}")
        self.buffer = buffer
        self.views, self.offsets, offset = {}, {}, 0
        for name, size in zip(names, sizes):
            self.views[name] = self.buffer[offset:offset + size].reshape(self.shapes[name])
            self.offsets[name] = offset
            offset += size
        self.body, self.extra = self.buffer[:offset], self.buffer[offset:]

    def matches(self, arrays):
        """Whether `arrays` has the names, shapes and dtype this buffer was laid out for."""
        return (arrays.keys() == self.views.keys() and all(np.shape(arrays[k]) == s for k, s in self.shapes.items())
                and np.result_type(*(arrays[k].dtype for k in self.shapes)) == self.buffer.dtype)

    def pack(self, arrays, scale=1):
        """buffer <- scale * arrays (same names and shapes as at construction, else ValueError). Returns the buffer."""
        if arrays.keys() != self.views.keys() or any(np.shape(arrays[k]) != s for k, s in self.shapes.items()):
            got = {name: np.shape(value) for name, value in sorted(arrays.items())}
            raise ValueError(f"the arrays changed since the fused buffer was laid out: expected {self.shapes}, "
                             f"got {got}")
        if all(arrays[name] is view for name, view in self.views.items()):
            if scale != 1:
                self.body *= scale
            return self.buffer
        for name, view in self.views.items():
            np.multiply(arrays[name], scale, out=view)
        return self.buffer


_SHM_DIR = "/dev/shm"


_JOB_FILE_PREFIXES = (f" {_SHM_DIR}/mpich_shm_", f" {_SHM_DIR}/dpnet-copy-")  # as /proc/self/maps shows them


def job_shared_memory_files():
    """The files of /dev/shm, still linked, that this process maps and that belong to its job: MPICH's segment of the
    processes on this machine (MPI_Finalize removes it) and a file of dpnet.shared_copy between its mapping and its
    unlinking. Empty where there is no /proc."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split(None, 5)[5].rstrip("\n") for line in maps
                     if any(prefix in line for prefix in _JOB_FILE_PREFIXES)]
    except OSError:
        return set()
    return {path for path in lines if not path.endswith(" (deleted)")}


def _unlink_job_shared_memory_files():
    """Unlink job_shared_memory_files(). MPI_Abort kills the processes before MPI_Finalize can: without this, every
    aborted job would leave megabytes in /dev/shm, for good. The processes that map the files keep their mappings
    until they exit."""
    for path in job_shared_memory_files():
        try:
            os.unlink(path)
        except OSError:
            pass


def _shared_memory_room():
    """Free bytes of the shared-memory file system MPICH maps its windows from (None where there is none)."""
    try:
        stats = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


class NodeSharedArray:
    """A 1-D array in one piece of memory mapped by every process of a communicator on one machine (an MPI-3
    shared-memory window, MPI_Win_allocate_shared): what the processes would otherwise each hold an identical copy of.

    `array` is the NumPy view of it in this process. Made with `each`, every process has an array of its own, which the
    others read as `of(rank)`. Writes by one process reach the others at the next `sync()`, which every process must
    call (it is a barrier): write, sync, then read. `free()` (collective) releases the memory; views of the arrays
    must not be used after it. Until then the memory lives as long as the job, whoever holds views.
    """

    live_bytes = 0  # the size of the arrays of this process's job that are not freed yet

    def __init__(self, arrays, index, window, node, nbytes):
        self._arrays, self.array, self._window, self._node = arrays, arrays[index], window, node
        self._nbytes = nbytes
        NodeSharedArray.live_bytes += nbytes

    def of(self, rank):
        """Process `rank`'s array (made with `each`; else the one array)."""
        return self._arrays[rank if len(self._arrays) > 1 else 0]

    def sync(self):
        """Collective: every process's writes so far become visible to every process."""
        self._window.Sync()
        self._node.Barrier()
        self._window.Sync()

    def free(self):
        """Collective: release the shared memory (views of `array` become invalid)."""
        if self._window is None:
            return
        self.sync()
        self.array = self._arrays = None
        self._window.Unlock_all()
        self._window.Free()
        self._node.Free()
        self._window = self._node = None
        NodeSharedArray.live_bytes -= self._nbytes


def check_in_sync(comm, flat_params, where=""):
    """Raise RuntimeError on every rank unless `flat_params` (an array, or a sequence of arrays taken in order) is
    bitwise identical on all ranks. Collective.

    Each rank hashes its buffer (8-byte BLAKE2b) and all hashes are gathered through one allreduce; the ranks that
    disagree with the majority (ties: with rank 0) are named, and `where` (e.g. "after epoch 2") is added to the
    message. Data-parallel replicas apply the same update to the same reduced gradient, so any difference at all means
    they diverged.
    """
    arrays = [flat_params] if isinstance(flat_params, np.ndarray) else list(flat_params)
    hasher = hashlib.blake2b(digest_size=8)
    for array in arrays:  # one array at a time: no concatenated copy
        hasher.update(np.ascontiguousarray(array).view(np.uint8).ravel())
    digest = hasher.digest()
    hashes = np.zeros(comm.size, dtype=np.int64)
    hashes[comm.rank] = np.frombuffer(digest, dtype=np.int64)[0]
    comm.allreduce(hashes)  # each slot is written by one rank only: the sum is a gather
    reference = collections.Counter(hashes.tolist()).most_common(1)[0][0]
    differ = [r for r in range(comm.size) if hashes[r] != reference]
    if differ:
        agree = [r for r in range(comm.size) if hashes[r] == reference]
        raise RuntimeError(f"parameters differ across processes{' ' + where if where else ''}: rank(s) {differ} "
                           f"disagree with rank(s) {agree} ({sum(a.size for a in arrays)} values checked); "
                           "the replicas have diverged")
