"""Sharded exchanges: the update rule's state kept once per job, a block per process (stage 1 of ZeRO, Rajbhandari
et al., 2020).

The parameters are laid out in one flat vector (by sorted name) cut into P contiguous blocks of equal size (padded:
MPI's collectives on equal blocks are faster than their variable-block forms). A step sums the gradients into each
process's block only (a reduce-scatter), applies the rule to that block, and shares the updated blocks (an allgather):
the same traffic as one allreduce, with the rule's state and the update's time divided by P. The rule is called for
every parameter on every process, with the process's segment of it (possibly empty), so scalar state such as Adam's
step count stays the same everywhere. A rule qualifies when it is elementwise and has an in-place variant.
"""

import numpy as np

from .buffers import FusedBuffer
from .node_memory import SharedSum


class ShardError(ValueError):
    """An update rule or a model that cannot be sharded."""


def is_shardable(rule):
    """Whether `rule` declares itself elementwise and has an in-place variant (dpnet.testing.check_update_rule checks
    that the declaration is true)."""
    return bool(getattr(rule, "elementwise", False)) and callable(getattr(rule, "in_place", None))


def check_shardable(rule, name):
    """Raise ShardError unless `rule` can have its state sharded (is_shardable)."""
    if not is_shardable(rule):
        raise ShardError(f"update rule {name!r} cannot shard its state: a rule must declare rule.elementwise = True "
                         "and provide rule.in_place (see dpnet.optim); train without shard_optimizer")


class ShardedExchange:
    """Sharded through MPI's block collectives: each process keeps its own flat parameter and gradient vectors; the
    gradients are reduce-scattered and the parameters allgathered. See dpnet.parallel.exchange for the methods.

    `offsets[name]` is where a parameter starts in the flat vector; `segments[name]` is (start, stop) of this
    process's part of it, in the parameter's flattened order (start == stop when it has none)."""

    sharded = True
    shared_memory = False

    def __init__(self, comm, params):
        self.comm = comm
        self.names = sorted(params)
        self.shapes = {name: params[name].shape for name in self.names}
        dtypes = {np.dtype(params[name].dtype) for name in self.names}
        if len(dtypes) != 1:
            raise ShardError(f"sharding needs parameters of one dtype (they become views of one vector), got "
                             f"{sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        sizes = [int(np.prod(self.shapes[name])) for name in self.names]
        self.size = sum(sizes)
        block = -(-self.size // comm.size)  # the last block ends with padding that no parameter uses
        self.padding = block * comm.size - self.size
        self.counts = [block] * comm.size
        self.lo, self.hi = block * comm.rank, block * (comm.rank + 1)
        self.offsets = dict(zip(self.names, np.cumsum([0, *sizes[:-1]]).tolist()))
        self.segments = {}
        for name, size in zip(self.names, sizes):
            start = min(max(self.lo - self.offsets[name], 0), size)
            self.segments[name] = (start, max(start, min(self.hi - self.offsets[name], size)))
        self.grad_norm = None
        self._params = self._grad = self.grad_block = None

    # ------------------------------------------------------------------------------------ layout
    def _allocate(self, params):
        self._grad = FusedBuffer(params, extra=self.padding)
        self._grad.extra[...] = 0  # the padding is summed and gathered but feeds nothing: zeros keep norms true
        self.grad_block = np.empty(self.hi - self.lo, dtype=self.dtype)
        self._params = FusedBuffer(params, extra=self.padding)
        self._params.extra[...] = 0

    def _writes_params(self):
        """Whether this process writes arrays copied into the parameter vector (each its own vector here)."""
        return True

    @property
    def params(self):
        """The flat parameter vector (None before bind and after release)."""
        return None if self._params is None else self._params.buffer

    def matches(self, params):
        """Whether params has the names, shapes and dtype this layout was made for."""
        return (sorted(params) == self.names
                and all(np.shape(params[name]) == shape for name, shape in self.shapes.items())
                and all(np.dtype(params[name].dtype) == self.dtype for name in self.names))

    def bind(self, params):
        """Collective: make params' arrays views of the flat parameter vector, copying in any array that is not one
        (a new model, use_params, a restored checkpoint). Arrays held elsewhere are copied, never changed."""
        if not self.matches(params):
            raise ShardError("the model's parameters changed names, shapes or dtype during training")
        if self._params is None:
            self._allocate(params)
        for name, view in self._params.views.items():
            if params[name] is not view:
                if self._writes_params():
                    view[...] = params[name]
                params[name] = view
        self._after_bind()

    def _after_bind(self):
        pass

    def gradient_views(self, params):
        return dict(self._grad.views)

    # ------------------------------------------------------------------------------------ a step
    def reduce(self, loss, grads, weight):
        """Sum weight * grads into this process's block; the loss and the summed gradient's squared norm travel in
        one small allreduce, so that every process can check the loss before anyone updates."""
        self._sum_block(grads, weight)
        scalars = np.array([loss * weight, float(np.vdot(self.grad_block, self.grad_block))], dtype=np.float64)
        self.comm.allreduce(scalars)
        self.grad_norm = float(np.sqrt(scalars[1]))
        return scalars[0]

    def _sum_block(self, grads, weight):
        self.comm.reduce_scatter(self._grad.pack(grads, weight), self.grad_block, self.counts)

    def update(self, params, configs, apply):
        """apply(name, w, dw, config) on flat views of this process's segment of every parameter and of its summed
        gradient (empty when it has none), config holding the rule's state of that segment; then share the blocks."""
        flat = self.params
        for name in self.names:
            start, stop = self.segments[name]
            first = self.offsets[name]
            w = flat[first + start:first + stop]
            dw = self.grad_block[first + start - self.lo:first + stop - self.lo] if stop > start else w[:0]
            next_w, configs[name] = apply(name, w, dw, self.shard_config(name, configs[name]))
            if next_w is not w:
                w[...] = next_w
        self._share_params()

    def _share_params(self):
        self.comm.allgather(self.params, self.counts)

    def summed_grads(self, whole=False):
        """None, or with `whole` (collective) the whole summed gradient by name on rank 0 (views of a buffer that the
        next step overwrites; None elsewhere)."""
        if not whole:
            return None
        flat = self._grad.buffer[:self.size + self.padding]
        self.comm.gather(self.grad_block, flat if self.comm.rank == 0 else None, self.counts)
        return dict(self._grad.views) if self.comm.rank == 0 else None

    def final_arrays(self, params):
        return dict(params)

    def release(self, params):
        """Collective: drop the vectors (the next bind lays them out anew)."""
        self._params = self._grad = self.grad_block = None

    # ------------------------------------------------------------------------------------ the rule's state
    def shard_config(self, name, config):
        """The rule config of `name` with every whole-parameter state array (from a checkpoint, or a run that was
        not sharded) replaced by this process's segment of it (a copy); segments already are left alone."""
        start, stop = self.segments[name]
        size = int(np.prod(self.shapes[name]))
        for key, value in config.items():
            if isinstance(value, np.ndarray) and value.shape != (stop - start,) and value.size == size:
                config[key] = np.array(value.reshape(-1)[start:stop])
        return config

    def whole_configs(self, configs, root=0):
        """Collective: on root, the rule configs with whole-parameter state arrays (shaped like the parameters)
        assembled from every process's segment; None elsewhere. Scalars are the same everywhere."""
        gathered = {} if self.comm.rank == root else None
        starts = np.cumsum([0, *self.counts[:-1]]).tolist()
        for name in self.names:
            config, first, size = configs[name], self.offsets[name], int(np.prod(self.shapes[name]))
            counts = [min(max(lo + count - first, 0), size) - min(max(lo - first, 0), size)
                      for lo, count in zip(starts, self.counts)]
            if gathered is not None:
                gathered[name] = dict(config)
            for key in sorted(k for k, v in config.items() if isinstance(v, np.ndarray)):
                part = np.ascontiguousarray(config[key]).reshape(-1)
                whole = np.empty(sum(counts), dtype=part.dtype) if gathered is not None else None
                self.comm.gather(part, whole, counts, root=root)
                if gathered is not None:
                    gathered[name][key] = whole.reshape(self.shapes[name])
        return gathered


class SharedShardedExchange(ShardedExchange):
    """Sharded on one machine: each process's gradient vector lies in shared memory (SharedSum) and each process sums
    its block straight from all of them; the parameter vector is one piece of shared memory that every process maps
    and updates its block of in place, so a barrier replaces the allgather and the machine holds one copy of the
    parameters. The barrier that ends a step also keeps anyone from overwriting its gradient vector (next backward)
    while another still sums from it, and the reduce's barrier keeps anyone from updating parameters that another
    still reads."""

    shared_memory = True

    @classmethod
    def create(cls, comm, params):
        """Collective: the exchange with its shared memory laid out, or None when the processes cannot share."""
        exchange = cls(comm, params)
        return exchange if exchange._share(params) else None

    def _share(self, params):
        """Collective: lay out the shared gradient vectors and parameter vector; False (nothing kept) if impossible."""
        self._shared_sum = SharedSum.create(self.comm, params)
        self._shared = self._shared_sum and self.comm.shared_array(self.size + self.padding, self.dtype)
        if self._shared is None:
            if self._shared_sum is not None:  # no room left for the parameters
                self._shared_sum.free()
            self._shared_sum = None
            return False
        self._grad = self._shared_sum.vector
        self.grad_block = self._shared_sum.summed[self.lo:self.hi]  # the sum is written over the own block
        self._params = FusedBuffer(params, extra=self.padding, buffer=self._shared.array)
        if self._writes_params():
            self._params.extra[...] = 0
        return True

    def _allocate(self, params):
        if not self._share(params):
            raise RuntimeError("the shared memory of the sharded state could not be laid out again (no room left in "
                               "/dev/shm?): train with shared_memory=False")

    def _writes_params(self):
        return self.comm.rank == 0  # one vector for all: rank 0's arrays are copied in

    def _after_bind(self):
        self._shared.sync()  # always, so that a process that copied nothing cannot read ahead of one that did

    def _sum_block(self, grads, weight):
        self._grad.pack(grads)  # the weight is applied in the sum
        self._shared_sum.sum_block(weight)

    def _share_params(self):
        self._shared.sync()

    def summed_grads(self, whole=False):
        if not whole:
            return None
        self._shared_sum.gather(root=0)  # each process's summed block lies in its own vector
        return dict(self._grad.views) if self.comm.rank == 0 else None

    def final_arrays(self, params):
        return {name: value.copy() for name, value in params.items()}  # the shared memory is freed by release

    def release(self, params):
        """Collective: replace params' views of the shared parameter vector by copies, then free the shared memory."""
        if self._params is not None:
            for name, view in self._params.views.items():
                if params[name] is view:
                    params[name] = view.copy()
            self._shared.free()
            self._shared_sum.free()
        self._shared = self._shared_sum = None
        super().release(params)
