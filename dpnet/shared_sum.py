"""Gradients summed through memory the processes share, when every process of a job runs on one machine.

MPI's reductions copy the data through the library's own buffers, and a data-parallel step first scales each
process's gradient by its weight n_r / N, a pass of its own. Here each process's gradient vector lies in shared memory
(dpnet.distributed.NodeSharedArray, made with `each`) and ends with a slot holding the process's weight. The vectors
are cut into P equal blocks (padded); after a barrier, each process sums its block from every process's vector,
weights applied, over its own block (which no other process reads). For 7.4 MB of float32 over 2 processes this takes
0.19-0.23 ms, against 0.67-0.87 ms for MPICH's Reduce_scatter_block, with or without the scaling pass in front of it
(`mpiexec -n 2 python benchmarks/bench_shared_sum.py`, four runs here); for 14.7 MB of float64, 0.70 against
1.87-2.14 ms. What comes next depends on the caller:

- sharded optimizer state (dpnet.sharding): the process updates its block of the parameters from its summed block;
- replicated state (the Solver's default): `gather()` copies the blocks the others summed into the process's own
  vector, so every process holds the whole sum, as after an allreduce.

Ordering: a process writes its vector (the backward pass) only after every process has finished reading it, which the
caller guarantees by a barrier at the end of each step (`gather()` ends with one; the sharded update with the
parameters' one).
"""

import numpy as np

from .distributed import FusedBuffer


class SharedSum:
    """The processes' gradient vectors in shared memory, laid out from `arrays` (a FusedBuffer with `extra` trailing
    slots of the caller's, such as the loss, then the padding and the weight slot), and their weighted sum.

    `vector` is this process's FusedBuffer (write the gradients into its views; `vector.extra[:extra]` are the
    caller's slots, summed like the rest). `counts` are the P equal blocks of the summed part, `lo:hi` this process's.
    Make one with `create()` (collective), which gives None when the processes cannot share memory.
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
