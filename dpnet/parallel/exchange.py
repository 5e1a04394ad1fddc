"""The gradient exchange: how the processes of a data-parallel job sum their gradients and update the parameters.

`make_exchange` chooses one when training starts; the Solver's step then calls the same methods whichever it holds:

- `bind(params)` (collective): the model's parameter arrays become arrays the exchange owns, which an update may
  overwrite in place (copies of arrays it did not make: an array held elsewhere never changes). The first call after
  creation or release lays the buffers out.
- `gradient_views(params)`: name -> array for the model to write its gradients into (views of the exchange's buffer).
- `reduce(loss, grads, weight) -> loss` (collective): weight * (loss, grads) summed over the processes, `weight` being
  the process's share n_r / N of the global batch; `grads` are the model's gradients (the views, or its own arrays).
- `update(params, configs, apply)`: `apply(name, w, dw, config) -> (next_w, config)` on this process's part of every
  parameter (the whole of it when replicated, its block when sharded), then the parts are shared.
- `summed_grads(whole)`: the summed gradients by name; sharded, None, or with whole=True the whole gradient gathered on
  rank 0 (collective). `grad_norm`: the summed gradient's norm when reduce computed it (sharded), else None.
- `sharded`, `shared_memory`: which of the exchanges below it is.
- `whole_configs(configs)` (collective): the update rule's state of whole parameters, on rank 0 when sharded.
- `final_arrays(params)`: arrays with params' values that outlive `release(params)` (collective), which frees the
  buffers and hands params arrays of their own.

| exchange                 | rule state     | gradients summed by                     | parameters shared by  |
|--------------------------|----------------|-----------------------------------------|-----------------------|
| ReplicatedExchange       | whole, per rank | MPI Allreduce (nothing with one process) | identical updates     |
| SharedReplicatedExchange | whole, per rank | SharedSum in /dev/shm                   | identical updates     |
| ShardedExchange          | a block per rank | MPI reduce-scatter                     | MPI allgather         |
| SharedShardedExchange    | a block per rank | SharedSum in /dev/shm                  | one vector in /dev/shm |

Across machines, with L >= 2 processes on each, the hierarchical exchanges (hierarchical.py) sum in each machine's
/dev/shm and use MPI between the machines only: HierarchicalReplicatedExchange (shared_memory True),
HierarchicalShardedExchange (one parameter vector per machine).
"""

import weakref

from .buffers import FusedBuffer
from .node_memory import SharedSum


def make_exchange(comm, params, shard=False, shared_memory=True):
    """Collective: the exchange for `comm` and the model's `params` (name -> ndarray). `shard` keeps the update rule's
    state once per job (a block per process; the rule must be elementwise, see is_shardable); `shared_memory` sums in
    memory the processes share: all of it when they run on one machine, each machine's part across machines with the
    same number (at least 2) of processes on each (hierarchical.py), else (or when /dev/shm has no room) MPI alone."""
    from .hierarchical import HierarchicalReplicatedExchange, HierarchicalShardedExchange
    from .sharded import SharedShardedExchange, ShardedExchange

    if comm.size == 1:
        return ReplicatedExchange(comm)
    if shard:
        shared = shared_memory and (SharedShardedExchange.create(comm, params)
                                    or HierarchicalShardedExchange.create(comm, params))
        return shared or ShardedExchange(comm, params)
    shared = shared_memory and (SharedReplicatedExchange.create(comm, params)
                                or HierarchicalReplicatedExchange.create(comm, params))
    return shared or ReplicatedExchange(comm)


class ReplicatedExchange:
    """Every process holds the whole summed gradient and the rule's whole state, and applies the same update: the
    gradients (and the loss, the buffer's extra slot) travel in one fused buffer through one in-place Allreduce. With
    one process nothing is summed and the model's gradients are used as they are."""

    sharded = False
    shared_memory = False
    grad_norm = None

    def __init__(self, comm):
        self.comm = comm
        self._fused = None  # the FusedBuffer the gradients are summed in, laid out when first needed
        self._owned = weakref.WeakValueDictionary()  # weak: an array the model dropped is not kept alive for it
        self._summed = None

    def _layout(self, arrays):
        """The buffer for `arrays` (name -> array), laid out anew when they do not match it."""
        if self._fused is None or not self._fused.matches(arrays):
            self._fused = FusedBuffer(arrays, extra=1)
        return self._fused

    def bind(self, params):
        for name, w in params.items():
            if self._owned.get(name) is not w:
                params[name] = self._owned[name] = w.copy()

    def gradient_views(self, params):
        return dict(self._layout(params).views)

    def reduce(self, loss, grads, weight):
        self._summed = grads
        if self.comm.size == 1:
            return loss
        fused = self._layout(grads)
        loss = self._sum(fused, loss, grads, weight)
        grads.update(fused.views)
        return loss

    def _sum(self, fused, loss, grads, weight):
        fused.pack(grads, weight)
        fused.extra[0] = loss * weight
        self.comm.allreduce(fused.buffer)
        return fused.extra[0]

    def update(self, params, configs, apply):
        for name, w in params.items():
            next_w, configs[name] = apply(name, w, self._summed[name], configs[name])
            params[name] = self._owned[name] = next_w  # a rule's result is the Solver's: no one else holds it

    def summed_grads(self, whole=False):
        return self._summed

    def whole_configs(self, configs):
        return configs

    def final_arrays(self, params):
        return dict(params)

    def release(self, params):
        self._owned = weakref.WeakValueDictionary()
        self._summed = None


class SharedReplicatedExchange(ReplicatedExchange):
    """ReplicatedExchange on one machine: the gradient buffers lie in shared memory and each process sums its block
    of everyone's buffer where it lies, weights applied there, then copies the blocks the others summed (SharedSum)."""

    shared_memory = True

    @classmethod
    def create(cls, comm, params):
        """Collective: the exchange, or None when the processes cannot share memory (or /dev/shm has no room)."""
        shared_sum = SharedSum.create(comm, params, extra=1)
        if shared_sum is None:
            return None
        exchange = cls(comm)
        exchange._shared_sum, exchange._fused = shared_sum, shared_sum.vector
        return exchange

    def _layout(self, arrays):
        if self._fused is None or not self._fused.matches(arrays):
            if self._shared_sum is not None:
                self._shared_sum.free()
            self._shared_sum = SharedSum.create(self.comm, arrays, extra=1)
            if self._shared_sum is None:
                raise RuntimeError("the gradients' shared memory could not be laid out again (no room left in "
                                   "/dev/shm?): train with shared_memory=False")
            self._fused = self._shared_sum.vector
        return self._fused

    def _sum(self, fused, loss, grads, weight):
        fused.pack(grads)  # the weight is applied in the sum
        fused.extra[0] = loss
        self._shared_sum.sum_block(weight)
        self._shared_sum.gather()
        return fused.extra[0]

    def release(self, params):
        super().release(params)
        if self._shared_sum is not None:
            self._shared_sum.free()
        self._shared_sum = self._fused = None
