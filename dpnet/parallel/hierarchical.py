"""Exchanges across several machines: shared memory inside each machine, MPI between them.

A job of P = N x L processes, L on each of N machines (the same L everywhere, L >= 2, N >= 2). Each process's
gradient vector lies in its machine's shared memory; the processes of a machine sum their machine's gradients block
by block where they lie, and only the machine sums travel between machines, each block between the processes that
hold the same local rank (one per machine), L such exchanges side by side. Each machine's link then carries what a
job of one process per machine would send (2 (N - 1) / N times the gradient for an allreduce, Thakur, Rabenseifner &
Gropp 2005), where MPICH's collectives over all P processes send more (benchmarks/bench_cluster.py measures both;
docs/scaling.md has the model). Horovod's hierarchical allreduce is built the same way.

- `HierarchicalReplicatedExchange`: process j of a machine sums block j of the machine's L vectors (SharedSum),
  allreduces it with the processes of local rank j on the other machines, then copies the other blocks; every
  process holds the whole summed gradient and applies the same update.
- `HierarchicalShardedExchange`: the optimizer state is sharded as in ShardedExchange (block r of the flat vector on
  rank r). Process r sums, from its machine's vectors, the blocks of the processes that share its local rank, then a
  reduce-scatter between them leaves it block r of the total; after the update the same processes allgather their
  blocks into their machine's one parameter vector in shared memory.

`make_exchange` picks these when the processes run on several machines and `shared_memory` is on; with one process
per machine, or different numbers of processes on the machines, the MPI exchanges are used.
"""

import numpy as np

from .buffers import FusedBuffer
from .communicators import MPICommunicator
from .exchange import SharedReplicatedExchange
from .node_memory import SharedSum
from .sharded import ShardedExchange, SharedShardedExchange


class NodeGroups:
    """The processes of a communicator grouped by machine. `node`: the processes of this machine (an MPICommunicator,
    ranked as in `comm`); `cross`: the processes with this process's local rank, one per machine (ranked as in
    `comm`); `members[k]`: the rank in `comm` of cross's process k. Make one with `create` (collective)."""

    def __init__(self, comm, node, cross, members):
        self.comm, self.node, self.cross, self.members = comm, node, cross, members

    @classmethod
    def create(cls, comm):
        """Collective: the groups, or None unless comm (an MPICommunicator) spans several machines with the same
        number of processes, at least 2, on each."""
        if not isinstance(comm, MPICommunicator) or comm.size < 4:
            return None
        from mpi4py import MPI

        node = comm.comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        cross = comm.comm.Split(color=node.Get_rank(), key=comm.rank)
        local, machines = node.Get_size(), cross.Get_size()
        # the same L everywhere exactly when L x N = P holds for the local rank 0 of every machine
        if not _everyone(comm, local * machines == comm.size and 2 <= local < comm.size):
            node.Free()
            cross.Free()
            return None
        node, cross = MPICommunicator(node), MPICommunicator(cross)
        members = np.zeros(machines, dtype=np.int64)
        members[cross.rank] = comm.rank
        cross.allreduce(members)  # one slot per process: the sum is a gather
        return cls(comm, node, cross, members.tolist())

    def everyone(self, ok):
        """Collective over the whole communicator: whether `ok` holds on every process."""
        return _everyone(self.comm, ok)

    def free(self):
        """Collective: free the two communicators."""
        self.node.comm.Free()
        self.cross.comm.Free()


def _everyone(comm, ok):
    flag = np.array([1 if ok else 0], dtype=np.int64)
    return bool(comm.allreduce(flag, op="min")[0])


class HierarchicalReplicatedExchange(SharedReplicatedExchange):
    """ReplicatedExchange across machines: each process sums its block of its machine's gradient vectors in shared
    memory (SharedSum, weights applied there), allreduces that block with the processes of its local rank on the
    other machines, then copies the blocks the others of its machine hold. See the module's docstring."""

    @classmethod
    def create(cls, comm, params):
        """Collective: the exchange, or None when the processes do not run on several machines, L >= 2 on each,
        or some machine's /dev/shm has not room for the gradients."""
        groups = NodeGroups.create(comm)
        if groups is None:
            return None
        shared_sum = SharedSum.create(groups.node, params, extra=1)
        if not groups.everyone(shared_sum is not None):
            if shared_sum is not None:
                shared_sum.free()
            groups.free()
            return None
        exchange = cls(comm)
        exchange._groups, exchange._shared_sum, exchange._fused = groups, shared_sum, shared_sum.vector
        return exchange

    def _layout(self, arrays):
        if self._groups is None:
            self._groups = NodeGroups.create(self.comm)
        if self._fused is None or not self._fused.matches(arrays):
            if self._shared_sum is not None:
                self._shared_sum.free()
            self._shared_sum = SharedSum.create(self._groups.node, arrays, extra=1)
            if not self._groups.everyone(self._shared_sum is not None):
                raise RuntimeError("the gradients' shared memory could not be laid out again (no room left in "
                                   "/dev/shm?): train with shared_memory=False")
            self._fused = self._shared_sum.vector
        return self._fused

    def _sum(self, fused, loss, grads, weight):
        fused.pack(grads)  # the weight is applied in the sum
        fused.extra[0] = loss
        block = self._shared_sum.sum_block(weight)  # this machine's sum of this process's block
        self._groups.cross.allreduce(block)  # between the machines
        self._shared_sum.gather()
        return fused.extra[0]

    def release(self, params):
        super().release(params)
        if self._groups is not None:
            self._groups.free()
        self._groups = None


class HierarchicalShardedExchange(SharedShardedExchange):
    """ShardedExchange across machines: block r of the flat vector (the rule's state, the summed gradient) on rank r
    as there; the gradients summed in each machine's shared memory, then between the processes of one local rank
    (a reduce-scatter); the updated blocks allgathered between the same processes into each machine's one parameter
    vector in shared memory. See the module's docstring."""

    @classmethod
    def create(cls, comm, params):
        """Collective: the exchange with its shared memory laid out, or None (see HierarchicalReplicatedExchange)."""
        groups = NodeGroups.create(comm)
        if groups is None:
            return None
        exchange = cls(comm, params)
        exchange._groups = groups
        if not exchange._share(params):
            groups.free()
            return None
        return exchange

    def _share(self, params):
        """Collective: lay out this machine's gradient vectors (one per process, and a slot for its weight) and its
        parameter vector; False, with nothing kept, unless every machine could."""
        if self._groups is None:
            self._groups = NodeGroups.create(self.comm)
        node, block = self._groups.node, self.counts[0]
        self._vectors = node.shared_array(block * self.comm.size + 1, self.dtype, each=True)
        self._shared = self._vectors and node.shared_array(block * self.comm.size, self.dtype)
        if not self._groups.everyone(self._shared is not None):
            for shared in (self._shared, self._vectors):
                if shared is not None:
                    shared.free()
            self._shared = self._vectors = None
            return False
        self._grad = FusedBuffer(params, extra=self.padding + 1, buffer=self._vectors.array)
        self._grad.extra[...] = 0  # the padding is summed but feeds nothing: zeros keep norms true
        self.grad_block = np.empty(block, dtype=self.dtype)
        self._params = FusedBuffer(params, extra=self.padding, buffer=self._shared.array)
        if self._writes_params():
            self._params.extra[...] = 0
        self._scratch = np.empty(block * len(self._groups.members), dtype=self.dtype)
        self._product = np.empty(block, dtype=self.dtype)
        return True

    def _writes_params(self):
        return self._groups.node.rank == 0  # one vector per machine: its first process's arrays are copied in

    def _blocks(self):
        """(k, rank, slice of the flat vector) of the blocks of the processes sharing this process's local rank."""
        block = self.counts[0]
        return [(k, rank, slice(rank * block, (rank + 1) * block)) for k, rank in enumerate(self._groups.members)]

    def _sum_block(self, grads, weight):
        """Sum this machine's vectors over the blocks of this local rank's processes (weights applied), then
        reduce-scatter those sums between the machines: block `rank` of the total lands in grad_block."""
        self._grad.pack(grads)
        vectors = self._vectors
        vectors.array[-1] = weight
        vectors.sync()
        local = [vectors.of(rank) for rank in range(self._groups.node.size)]
        weights = [vector[-1] for vector in local]
        block = self.counts[0]
        for k, _, part in self._blocks():
            out = self._scratch[k * block:(k + 1) * block]
            if all(w == weights[0] for w in weights):  # equal shards: add, then scale once
                np.add(local[0][part], local[1][part], out=out)
                for vector in local[2:]:
                    out += vector[part]
                out *= weights[0]
            else:
                np.multiply(local[0][part], weights[0], out=out)
                for vector, w in zip(local[1:], weights[1:]):
                    out += np.multiply(vector[part], w, out=self._product)
        self._groups.cross.reduce_scatter(self._scratch, self.grad_block, [block] * len(self._groups.members))

    def _share_params(self):
        """Allgather the updated blocks between this local rank's processes into this machine's parameter vector,
        then a barrier of the machine (its other processes wrote the other blocks)."""
        block, flat, mine = self.counts[0], self.params, self._groups.cross.rank
        gathered = self._scratch
        gathered[mine * block:(mine + 1) * block] = flat[self.lo:self.hi]
        self._groups.cross.allgather(gathered, [block] * len(self._groups.members))
        for k, _, part in self._blocks():
            if k != mine:
                flat[part] = gathered[k * block:(k + 1) * block]
        self._shared.sync()

    def summed_grads(self, whole=False):
        """As ShardedExchange: the whole summed gradient gathered on rank 0 (into its gradient vector, which the next
        step overwrites) with `whole`; else None."""
        return ShardedExchange.summed_grads(self, whole)

    def release(self, params):
        """Collective: params get copies of their views of the shared parameter vector; the shared memory and the
        machine groups are freed."""
        if self._params is not None:
            for name, view in self._params.views.items():
                if params[name] is view:
                    params[name] = view.copy()
            self._shared.free()
            self._vectors.free()
        if self._groups is not None:
            self._groups.free()
        self._shared = self._vectors = self._groups = None
        ShardedExchange.release(self, params)
