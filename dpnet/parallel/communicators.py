"""Communicators: how the processes of a data-parallel job move bytes.

A communicator has `rank`, `size`, `is_root`, `allreduce(buf, op="sum")` and `bcast(buf, root=0)` (in place on a
contiguous NumPy array, returning it), the block collectives `reduce_scatter`, `allgather` and `gather` (1-D buffers
cut into one block per process, see `block_counts`), `barrier()`, `abort(code=1)`, `local_size()` (processes on this
machine) and `shared_array(size, dtype, each=False)` (memory every process maps when all run on one machine, else
None). `SerialCommunicator` is the single process and never imports mpi4py; `MPICommunicator` wraps mpi4py's buffer
calls, so no object is pickled; its collectives are timed by the collective watchdog when one runs (watchdog.py).
`get_communicator()` picks one from the launcher's environment.
"""

import os
import sys
import time

import numpy as np

from .environment import (SHM_DIR, launched_size, shared_memory_room, skip_ucx_shared_memory,
                          unlink_job_shared_memory_files, warn)
from .failures import flush_std_streams, install_abort_handler
from .node_memory import NodeSharedArray
from .watchdog import collective

OPS = ("sum", "max", "min")


def check_buffer(buf, op="sum"):
    """Raise TypeError or ValueError unless `buf` is a writable, contiguous numeric ndarray and `op` a known op."""
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
    check_buffer(buf)
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
        check_buffer(buf, op)
        return buf

    def bcast(self, buf, root=0):
        check_buffer(buf)
        if root != 0:
            raise ValueError(f"root must be 0 in a single process, got {root}")
        return buf

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        """See MPICommunicator.reduce_scatter: with one process, block 0 is the whole sum."""
        _check_blocks(sendbuf, counts, self.size)
        check_buffer(recvbuf)
        recvbuf[...] = sendbuf
        return recvbuf

    def allgather(self, buf, counts):
        """See MPICommunicator.allgather: with one process there is nothing to gather."""
        _check_blocks(buf, counts, self.size)
        return buf

    def gather(self, sendbuf, recvbuf, counts, root=0):
        """See MPICommunicator.gather."""
        check_buffer(sendbuf)
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
        flush_std_streams()
        os._exit(code)


class MPICommunicator:
    """A communicator over mpi4py (default: MPI.COMM_WORLD). Buffers are NumPy arrays reduced in place.

    With more than one process, creating it installs `install_abort_handler`: any rank's unhandled exception, SIGINT
    or SIGTERM ends the whole job instead of leaving the others blocked in a collective."""

    def __init__(self, comm=None):
        skip_ucx_shared_memory()
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

    @collective("allreduce")
    def allreduce(self, buf, op="sum"):
        """Element-wise reduce `buf` over all processes, in place; every process gets the result. Returns buf."""
        check_buffer(buf, op)
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[op])
        return buf

    @collective("bcast")
    def bcast(self, buf, root=0):
        """Overwrite `buf` on every process with root's `buf` (same shape and dtype everywhere). Returns buf."""
        check_buffer(buf)
        self.comm.Bcast(buf, root=root)
        return buf

    @collective("reduce_scatter")
    def reduce_scatter(self, sendbuf, recvbuf, counts):
        """Sum the 1-D `sendbuf` over all processes, block by block: block r (counts[r] elements, the blocks back to
        back in rank order) of the sum lands in process r's `recvbuf` (counts[rank] elements). Returns recvbuf."""
        _check_blocks(sendbuf, counts, self.size)
        check_buffer(recvbuf)
        if recvbuf.size != counts[self.rank]:
            raise ValueError(f"recvbuf has {recvbuf.size} elements, block {self.rank} has {counts[self.rank]}")
        if len(set(counts)) == 1:  # equal blocks: the block variant is the faster one in MPICH
            self.comm.Reduce_scatter_block(sendbuf, recvbuf, op=self._MPI.SUM)
        else:
            self.comm.Reduce_scatter(sendbuf, recvbuf, recvcounts=list(counts), op=self._MPI.SUM)
        return recvbuf

    @collective("allgather")
    def allgather(self, buf, counts):
        """In place on the 1-D `buf`: block r (counts[r] elements, back to back in rank order) is process r's; every
        process ends with all blocks. Returns buf."""
        _check_blocks(buf, counts, self.size)
        if len(set(counts)) == 1:  # equal blocks: Allgather is faster than Allgatherv in MPICH
            self.comm.Allgather(self._MPI.IN_PLACE, buf)
        else:
            self.comm.Allgatherv(self._MPI.IN_PLACE, [buf, (list(counts), _displacements(counts))])
        return buf

    @collective("gather")
    def gather(self, sendbuf, recvbuf, counts, root=0):
        """Process r's 1-D `sendbuf` (counts[r] elements) becomes block r of root's `recvbuf` (sum(counts) elements;
        None on the other processes). Returns recvbuf."""
        check_buffer(sendbuf)
        if sendbuf.size != counts[self.rank]:
            raise ValueError(f"sendbuf has {sendbuf.size} elements, block {self.rank} has {counts[self.rank]}")
        if self.rank == root:
            _check_blocks(recvbuf, counts, self.size)
            self.comm.Gatherv(sendbuf, [recvbuf, (list(counts), _displacements(counts))], root=root)
        else:
            self.comm.Gatherv(sendbuf, None, root=root)
        return recvbuf

    @collective("barrier")
    def barrier(self):
        self.comm.Barrier()

    def local_size(self):
        """Number of processes of this communicator on this machine (collective on the first call, then cached)."""
        if self._local_size is None:
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
            self._local_size = node.Get_size()
            node.Free()
        return self._local_size

    @collective("shared_array")
    def shared_array(self, size, dtype, each=False):
        """Collective: a NodeSharedArray of `size` elements of `dtype` that every process maps (with `each`, one such
        array per process), when all processes run on one machine; else None. None too, with a note on stderr, when
        /dev/shm has not room for it besides what this job's live shared arrays may still fill: a process touching
        shared pages beyond the file system's size would die of SIGBUS."""
        MPI = self._MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        itemsize = np.dtype(dtype).itemsize
        needed = size * itemsize * (self.size if each else 1)
        room = shared_memory_room() if self.rank == 0 else None
        room = self.comm.bcast(room, root=0)  # one decision for all (once per training run: pickling is fine)
        if room is not None:  # tmpfs counts pages once written: the live arrays' untouched pages are spoken for
            room -= NodeSharedArray.live_bytes
        if node.Get_size() != self.size or (room is not None and room < needed):
            if node.Get_size() == self.size and self.rank == 0:
                warn(f"dpnet: {SHM_DIR} has {room / 2**20:.0f} MB free, {needed / 2**20:.0f} MB are needed to "
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
        flush_std_streams()
        unlink_job_shared_memory_files()
        time.sleep(0.2)  # let the launcher forward what this process just wrote: an aborted job's unread output is lost
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # MPICH's MPI_Abort can return before the process manager's kill arrives: never run on


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
    launched, size = launched_size()
    if not launched or size == 1:
        return SerialCommunicator()
    comm = MPICommunicator()
    if size is not None and comm.size != size:
        raise RuntimeError(f"the launcher started {size} processes but MPI sees {comm.size}: mpi4py is not using the "
                           "launcher's MPI (with Slurm use srun --mpi=pmi2 or pmix, or the mpiexec of the MPI that "
                           "mpi4py was built with)")
    return comm if comm.size > 1 else SerialCommunicator()


def as_communicator(comm):
    """`comm` as a dpnet communicator: None picks get_communicator(); an mpi4py communicator is wrapped in an
    MPICommunicator; a dpnet communicator is returned as it is. Anything else is a TypeError, raised before any
    collective could leave the other processes waiting."""
    if comm is None:
        return get_communicator()
    if isinstance(comm, (SerialCommunicator, MPICommunicator)):
        return comm
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm):
        return MPICommunicator(comm)
    needed = ("rank", "size", "allreduce", "bcast", "barrier", "abort")
    if all(hasattr(comm, name) for name in needed):
        return comm  # a communicator of the caller's own (a wrapper, a test double)
    raise TypeError(f"comm must be a dpnet communicator (dpnet.parallel.get_communicator()) or an mpi4py "
                    f"communicator, got {type(comm).__name__}")
