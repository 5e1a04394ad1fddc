"""Optimizer state sharded over the processes of a data-parallel job (stage 1 of ZeRO, Rajbhandari et al., 2020).

Without sharding every process keeps the update rule's whole state (velocity; Adam's m and v) and applies the same
update to the same reduced gradient. With it, the parameters are laid out in one flat vector cut into P contiguous
blocks of equal size, one per process (the vector is padded to a multiple of P: MPI's collectives on equal blocks,
Reduce_scatter_block and Allgather, are faster than their variable-block forms):

1. the gradients are summed with a reduce-scatter: each process receives the sum of its own block only;
2. each process applies the update rule to its block, so it keeps the rule's state for its block only;
3. an allgather hands every process the whole updated vector, so the replicas are identical by construction.

When all the processes run on one machine, shared memory replaces both collectives (dpnet.distributed.NodeSharedArray,
MPI-3 shared windows). Each process's gradient vector is readable by the others, so each process sums its block from
all of them itself (step 1, after a barrier); and the parameter vector is one piece of memory that every process maps
and updates its block of in place, so a barrier replaces the allgather (step 3). The machine then holds one copy of
the parameters instead of one per process, and no gradient or parameter is copied between processes. (Across
machines, each process keeps its own vectors and the steps are MPI's collectives.)

A reduce-scatter followed by an allgather moves what one allreduce moves (it is how MPI implements a large allreduce),
while the state's memory and the update's time are divided by P. A rule qualifies when it is elementwise (an
element's update depends on that element's values alone) and has an in-place variant: the built-in rules declare
both (`rule.elementwise = True`, `rule.in_place`). The rule is called for every parameter on every process, with the
process's segment of it (possibly empty), so scalar state such as Adam's step count stays the same everywhere.
"""

import numpy as np

from .distributed import FusedBuffer
from .factored_grads import FactoredGradients
from .shared_sum import SharedSum


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


class ShardedState:
    """The flat layout of a model's parameters over the processes of `comm`, and the collectives of a sharded step.

    Parameters are laid out by sorted name (a dpnet.distributed.FusedBuffer), padded to equal blocks; `offsets[name]`
    is where a parameter starts. bind() (collective) lays out the flat parameter vector, `params`, and makes the
    model's parameter arrays views of it, and the flat gradient vector, whose views by name, `grads`, the model writes
    into. `segments[name]` is (start, stop) of this process's part of that parameter, in the parameter's flattened
    order (start == stop when it has none).

    With `shared_memory`, when every process runs on one machine (`comm.shared_array` gives memory: `shared` is then
    True), both vectors are shared memory: one parameter vector for all processes, and one gradient vector per process
    that the others read. The gradients are then summed where they lie (each process adds up its block of every
    process's vector) instead of by MPI's reduce-scatter, which copies them through MPI's own buffers: 0.19-0.23 ms
    against 0.67-0.87 ms for 7.4 MB over 2 processes here (benchmarks/bench_shared_sum.py), and the weighting of each
    process's gradient costs no pass of its own.

    With `factored_params` as well (names of 2-D parameters whose gradients the model delivers as factors x.T @ dout,
    see dpnet.factored_grads) and `capacity` (the largest global batch), no process computes a whole gradient: each
    computes its block of those from every process's rows of x and dout (`factored` is then True). Call start() before
    the model's loss, and pass it `grads` and `weight_factors`.
    """

    def __init__(self, comm, model_params, shared_memory=True, factored_params=(), capacity=None):
        self.comm = comm
        self.shared_memory = shared_memory
        bad = [name for name in factored_params if name not in model_params or np.ndim(model_params[name]) != 2]
        if bad:
            raise ShardError(f"factored parameters must be 2-D parameters of the model: {', '.join(map(str, bad))}")
        self._factored_names = tuple(factored_params) if capacity else ()
        self._capacity = capacity
        self.names = sorted(model_params)
        self.shapes = {name: model_params[name].shape for name in self.names}
        dtypes = {np.dtype(model_params[name].dtype) for name in self.names}
        if len(dtypes) != 1:
            raise ShardError(f"sharding needs parameters of one dtype (they become views of one vector), got "
                             f"{sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        sizes = [int(np.prod(self.shapes[name])) for name in self.names]
        self.size = sum(sizes)
        block = -(-self.size // comm.size)  # the last block ends with padding that no parameter uses
        self._padding = block * comm.size - self.size
        self.counts = [block] * comm.size
        self.lo = block * comm.rank
        self.hi = self.lo + block
        self.offsets = dict(zip(self.names, np.cumsum([0, *sizes[:-1]]).tolist()))
        self.segments = {}
        for name, size in zip(self.names, sizes):
            start = min(max(self.lo - self.offsets[name], 0), size)
            self.segments[name] = (start, max(start, min(self.hi - self.offsets[name], size)))
        self._params = self._grad = self._shared = self._shared_sum = self._factored = self._whole_grad = None
        self.grads = self.grad_block = None

    def _allocate(self, model_params):
        """Collective: lay out the parameter and gradient vectors (in shared memory when the processes can share)."""
        get_shared = getattr(self.comm, "shared_array", None) if self.shared_memory else None
        if get_shared is not None:  # the gradients (factored, or dpnet.shared_sum), then the parameters
            if self._factored_names:
                self._factored = FactoredGradients.create(self.comm, self, self._factored_names, self._capacity)
            else:
                self._shared_sum = SharedSum.create(self.comm, model_params)
            gradients = self._factored or self._shared_sum
            self._shared = gradients and get_shared(self.size + self._padding, self.dtype)
            if self._shared is None and gradients is not None:  # no room left for the parameters
                gradients.free()
                self._factored = self._shared_sum = None
        if self._factored is not None:
            self.grad_block = np.zeros(self.hi - self.lo, dtype=self.dtype)  # its padding stays zero
            self.grads = self._factored.rest_grads
        elif self._shared is not None:
            self._grad = self._shared_sum.vector
            self.grad_block = self._shared_sum.summed[self.lo:self.hi]  # the sum is written over the own block
        else:
            self._grad = FusedBuffer(model_params, extra=self._padding)
            self._grad.extra[...] = 0  # the padding is summed and gathered but feeds nothing: zeros keep norms true
            self.grad_block = np.empty(self.hi - self.lo, dtype=self.dtype)
        self._params = FusedBuffer(model_params, extra=self._padding, buffer=self._shared and self._shared.array)
        if self._writes_shared_params():
            self._params.extra[...] = 0
        if self._factored is None:
            self.grads = self._grad.views

    @property
    def params(self):
        """The flat parameter vector (None before bind and after release)."""
        return None if self._params is None else self._params.buffer

    @property
    def shared(self):
        """Whether the vectors are memory shared by the processes (bound, one machine, shared_memory)."""
        return self._shared is not None

    @property
    def factored(self):
        """Whether the factored weights' gradient blocks are computed from everyone's rows (dpnet.factored_grads)."""
        return self._factored is not None

    @property
    def weight_factors(self):
        """The model loss's weight_factors callback when factored, else None."""
        return None if self._factored is None else self._factored.receive

    @property
    def capacity(self):
        """The largest global batch the factored rows are laid out for (None when nothing is factored)."""
        return self._capacity if self._factored_names else None

    def start(self, rows, weight, batch):
        """Before the model's loss in a step: this process computes rows `rows` (a slice) of a global batch of `batch`
        samples (at most `capacity`), with weight n_r / N."""
        if self._factored is not None:
            self._factored.start(rows, weight, batch)

    def matches(self, model_params):
        """Whether model_params has the names, shapes and dtype this layout was made for."""
        return (sorted(model_params) == self.names
                and all(np.shape(model_params[name]) == shape for name, shape in self.shapes.items())
                and all(np.dtype(model_params[name].dtype) == self.dtype for name in self.names))

    def bind(self, model_params):
        """Collective: make model_params' arrays views of the flat parameter vector, copying in any array that is not
        one (a new model, use_params, a restored checkpoint; into shared memory, rank 0's copy). Arrays held elsewhere
        are copied, never changed."""
        if self._params is None:
            self._allocate(model_params)
        for name, view in self._params.views.items():
            if model_params[name] is not view:
                if self._writes_shared_params():
                    view[...] = model_params[name]
                model_params[name] = view
        if self._shared is not None:
            self._shared.sync()  # always, so that a process that copied nothing cannot read ahead of one that did

    def _writes_shared_params(self):
        return self._shared is None or self.comm.rank == 0

    def release(self, model_params):
        """Collective: drop the vectors (the next bind() lays them out anew) and free the shared memory, first
        replacing any of model_params' arrays that is a view of the shared parameter vector by a copy. Views of the
        shared memory kept elsewhere become invalid."""
        if self._shared is not None:
            for name, view in self._params.views.items():
                if model_params[name] is view:
                    model_params[name] = view.copy()
            self._shared.free()
            (self._factored or self._shared_sum).free()
            self._shared = self._shared_sum = self._factored = None
        self._params = self._grad = self.grads = self.grad_block = self._whole_grad = None

    def reduce(self, loss, weight, local_grads):
        """Sum weight * local gradients over the processes into this process's block; return (summed loss, norm of
        the summed gradient). local_grads are copied into the gradient vector unless they are its views already."""
        if self._factored is not None:
            for name, array in local_grads.items():  # views of the shared slots already, from the model
                if array is not self.grads.get(name, array):
                    self.grads[name][...] = array
            self._factored.sum_block(self.grad_block, self.params)
        elif self._shared_sum is None:
            self.comm.reduce_scatter(self._grad.pack(local_grads, weight), self.grad_block, self.counts)
        else:
            self._grad.pack(local_grads)  # the weight is applied in the sum
            self._shared_sum.sum_block(weight)
        scalars = np.array([loss * weight, float(np.vdot(self.grad_block, self.grad_block))], dtype=np.float64)
        self.comm.allreduce(scalars)
        return scalars[0], float(np.sqrt(scalars[1]))

    def gather_grads(self):
        """Collective: on rank 0, the whole summed gradient, as views by name (of rank 0's gradient vector, which the
        next step overwrites); None elsewhere."""
        if self._factored is not None:  # the blocks are private: gathered into a whole vector on rank 0
            if self.comm.rank == 0 and self._whole_grad is None:
                self._whole_grad = FusedBuffer({n: np.empty(self.shapes[n], self.dtype) for n in self.names},
                                               extra=self._padding)
            whole = self._whole_grad
            self.comm.gather(self.grad_block, whole.buffer if whole is not None else None, self.counts)
            return dict(whole.views) if whole is not None else None
        if self._shared_sum is None:
            flat = self._grad.buffer[:self.size + self._padding]
            self.comm.gather(self.grad_block, flat if self.comm.rank == 0 else None, self.counts)
        else:  # each process's summed block lies in its own vector
            self._shared_sum.gather(root=0)
        return dict(self.grads) if self.comm.rank == 0 else None

    def update(self, apply):
        """apply(name, w_segment, dw_segment) for every parameter, in name order: flat views of this process's part
        of the parameter and of its summed gradient (empty when it has none); then the allgather of the parameters
        (with shared memory, a barrier: every process updated its block of the one vector in place)."""
        params = self.params
        for name in self.names:
            start, stop = self.segments[name]
            first = self.offsets[name]
            w = params[first + start:first + stop]
            dw = self.grad_block[first + start - self.lo:first + stop - self.lo] if stop > start else w[:0]
            apply(name, w, dw)
        if self._shared is not None:
            self._shared.sync()
        else:
            self.comm.allgather(params, self.counts)

    # ------------------------------------------------------------------------------------ state of the update rule
    def shard_config(self, name, config):
        """The rule config of `name` with every whole-parameter state array (from a checkpoint, or a run that was
        not sharded) replaced by this process's segment of it (a copy); segments already are left alone."""
        start, stop = self.segments[name]
        size = int(np.prod(self.shapes[name]))
        for key, value in config.items():
            if isinstance(value, np.ndarray) and value.shape != (stop - start,) and value.size == size:
                config[key] = np.array(value.reshape(-1)[start:stop])
        return config

    def gather_configs(self, configs, root=0):
        """Collective: on root, the rule configs with whole-parameter state arrays (shaped like the parameters)
        assembled from every process's segment; None elsewhere. Scalars are the same everywhere."""
        gathered = {} if self.comm.rank == root else None
        for name in self.names:
            config = configs[name]
            counts = [min(max(hi - self.offsets[name], 0), size) - min(max(lo - self.offsets[name], 0), size)
                      for lo, hi, size in self._blocks(name)]
            if gathered is not None:
                gathered[name] = dict(config)
            for key in sorted(k for k, v in config.items() if isinstance(v, np.ndarray)):
                part = np.ascontiguousarray(config[key]).reshape(-1)
                whole = None
                if gathered is not None:
                    whole = np.empty(sum(counts), dtype=part.dtype)
                self.comm.gather(part, whole, counts, root=root)
                if gathered is not None:
                    gathered[name][key] = whole.reshape(self.shapes[name])
        return gathered

    def _blocks(self, name):
        size = int(np.prod(self.shapes[name]))
        starts = np.cumsum([0, *self.counts[:-1]]).tolist()
        return [(lo, lo + count, size) for lo, count in zip(starts, self.counts)]
