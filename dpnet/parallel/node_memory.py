"""Memory that the processes of one machine share: MPI-3 shared windows, and gradients summed where they lie.

MPI's reductions copy the data through the library's own buffers. On one machine each process's gradient vector can
lie in shared memory instead (`SharedSum`), and each process sums its block straight from every process's vector.
"""

import numpy as np

from .buffers import FusedBuffer
from .watchdog import collective


class NodeSharedArray:
    """A 1-D array in one piece of memory mapped by every process of a communicator on one machine (an MPI-3
    shared-memory window, MPI_Win_allocate_shared; made by `comm.shared_array`).

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

    @collective("shared-memory barrier")
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


class SharedSum:
    """The processes' gradient vectors in shared memory, and their weighted sum, block by block.

    `vector` is this process's FusedBuffer laid out from `arrays` (write the gradients into its views;
    `vector.extra[:extra]` are the caller's slots, such as the loss, summed like the rest), followed by padding and a
    slot for the process's weight. The summed part is cut into P equal blocks, `lo:hi` this process's. Make one with
    `create()` (collective), which gives None when the processes cannot share memory.

    Ordering: a process writes its vector (the backward pass) only after every process has finished reading it, which
    the caller guarantees by a barrier at the end of each step (`gather()` ends with one).
    """

    @classmethod
    def create(cls, comm, arrays, extra=0):
        """Collective: a SharedSum for `arrays` (name -> array, one dtype), or None when comm has no shared memory."""
        get_shared = getattr(comm, "shared_array", None)
        if get_shared is None or comm.size == 1:
            return None
        size = sum(int(np.prod(np.shape(a))) for a in arrays.values()) + extra
        block = -(-size // comm.size)
        dtype = np.result_type(*(a.dtype for a in arrays.values()))
        shared = get_shared(block * comm.size + 1, dtype, each=True)
        return None if shared is None else cls(comm, shared, arrays, extra, block)

    def __init__(self, comm, shared, arrays, extra, block):
        self.comm, self._shared = comm, shared
        summed = block * comm.size
        n = sum(int(np.prod(np.shape(a))) for a in arrays.values())
        self.vector = FusedBuffer(arrays, extra=summed + 1 - n, buffer=shared.array)  # extra, padding, weight
        self.vector.extra[...] = 0  # the padding is summed but feeds nothing: zeros keep norms true
        self.counts = [block] * comm.size
        self.lo, self.hi = block * comm.rank, block * (comm.rank + 1)
        self.summed = self.vector.buffer[:summed]
        self._scratch = None

    def matches(self, arrays):
        return self.vector.matches(arrays)

    def sum_block(self, weight):
        """Collective: this process's block of sum over processes of weight_r * vector_r, written over that block of
        this process's vector (returned, a view). Call after writing the vector."""
        self.vector.buffer[-1] = weight
        self._shared.sync()
        return self._add_blocks(self.vector.buffer[-1])  # as stored (rounded to the dtype), like the others'

    def _add_blocks(self, weight):
        out = self.summed[self.lo:self.hi]
        others = [self._shared.of(rank) for rank in range(self.comm.size) if rank != self.comm.rank]
        weights = [vector[-1] for vector in others]
        if all(w == weight for w in weights):  # equal shards: add, then scale the block once
            for vector in others:
                out += vector[self.lo:self.hi]
            out *= weight
            return out
        if self._scratch is None:
            self._scratch = np.empty_like(out)
        out *= weight
        for vector, w in zip(others, weights):
            out += np.multiply(vector[self.lo:self.hi], w, out=self._scratch)
        return out

    def gather(self, root=None):
        """Collective, after sum_block on every process: once all are summed (a barrier), copy the blocks the other
        processes summed into this process's vector (only on `root`, when given), then a barrier, after which anyone
        may write again."""
        self._shared.sync()
        if root is None or root == self.comm.rank:
            for rank in range(self.comm.size):
                if rank != self.comm.rank:
                    lo, hi = self.counts[0] * rank, self.counts[0] * (rank + 1)
                    self.summed[lo:hi] = self._shared.of(rank)[lo:hi]
        self._shared.sync()

    def sync(self):
        """Collective: a barrier (with the memory ordering shared memory needs)."""
        self._shared.sync()

    def free(self):
        """Collective: release the shared memory (views of the vector become invalid)."""
        self._shared.free()
