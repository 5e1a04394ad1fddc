"""Optimizer state sharded over the processes of a data-parallel job (stage 1 of ZeRO, Rajbhandari et al., 2020).

Without sharding every process keeps the update rule's whole state (velocity; Adam's m and v) and applies the same
update to the same reduced gradient. With it, the parameters are laid out in one flat vector cut into P contiguous
blocks of equal size, one per process (the vector is padded to a multiple of P: MPI's collectives on equal blocks,
Reduce_scatter_block and Allgather, are faster than their variable-block forms):

1. the gradients are summed with a reduce-scatter: each process receives the sum of its own block only;
2. each process applies the update rule to its block, so it keeps the rule's state for its block only;
3. an allgather hands every process the whole updated vector, so the replicas are identical by construction.

A reduce-scatter followed by an allgather moves what one allreduce moves (it is how MPI implements a large allreduce),
while the state's memory and the update's time are divided by P. A rule qualifies when it is elementwise (an
element's update depends on that element's values alone) and has an in-place variant: the built-in rules declare
both (`rule.elementwise = True`, `rule.in_place`). The rule is called for every parameter on every process, with the
process's segment of it (possibly empty), so scalar state such as Adam's step count stays the same everywhere.
"""

import numpy as np

from .distributed import FusedBuffer


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

    Parameters are laid out by sorted name (a dpnet.distributed.FusedBuffer), padded to equal blocks. `params` is the
    flat parameter vector; bind() makes the model's parameter arrays views of it. `grads` maps names to views of the
    flat gradient vector, for the model to write into. `segments[name]` is (start, stop) of this process's part of
    that parameter, in the parameter's flattened order (start == stop when it has none).
    """

    def __init__(self, comm, model_params):
        self.comm = comm
        self.names = sorted(model_params)
        self.shapes = {name: model_params[name].shape for name in self.names}
        dtypes = {np.dtype(model_params[name].dtype) for name in self.names}
        if len(dtypes) != 1:
            raise ShardError(f"sharding needs parameters of one dtype (they become views of one vector), got "
                             f"{sorted(d.name for d in dtypes)}")
        self.dtype = dtypes.pop()
        self.size = sum(int(np.prod(shape)) for shape in self.shapes.values())
        block = -(-self.size // comm.size)  # the last block ends with padding that no parameter uses
        self._padding = block * comm.size - self.size
        self.counts = [block] * comm.size
        self.lo = block * comm.rank
        self.hi = self.lo + block
        self._grad = self._new_vector(model_params)
        self.grads = self._grad.views
        self.offsets = self._grad.offsets
        self.segments = {}
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            start = min(max(self.lo - self.offsets[name], 0), size)
            self.segments[name] = (start, max(start, min(self.hi - self.offsets[name], size)))
        self._params = None
        self.grad_block = np.empty(block, dtype=self.dtype)

    def _new_vector(self, model_params):
        vector = FusedBuffer(model_params, extra=self._padding)
        vector.extra[...] = 0  # the padding is summed and gathered but feeds nothing: zeros keep the norm true
        return vector

    @property
    def params(self):
        """The flat parameter vector (None before bind and after release_params)."""
        return None if self._params is None else self._params.buffer

    def matches(self, model_params):
        return self._grad.matches(model_params)

    def bind(self, model_params):
        """Make model_params' arrays views of the flat parameter vector, copying in any array that is not one (a new
        model, use_params, a restored checkpoint). Arrays held elsewhere are copied, never changed."""
        if self._params is None:
            self._params = self._new_vector(model_params)
        for name, view in self._params.views.items():
            if model_params[name] is not view:
                view[...] = model_params[name]
                model_params[name] = view

    def release_params(self):
        """Hand the flat parameter vector over to whoever holds the model's arrays now (final_params): the next
        bind() lays out a new one."""
        self._params = None

    def reduce(self, loss, weight, local_grads):
        """Sum weight * local gradients over the processes into this process's block; return (summed loss, norm of
        the summed gradient). local_grads are copied into the gradient vector unless they are its views already."""
        flat = self._grad.pack(local_grads, weight)
        self.comm.reduce_scatter(flat, self.grad_block, self.counts)
        scalars = np.array([loss * weight, float(np.vdot(self.grad_block, self.grad_block))], dtype=np.float64)
        self.comm.allreduce(scalars)
        return scalars[0], float(np.sqrt(scalars[1]))

    def gather_grads(self):
        """Collective: the whole summed gradient, as views by name (of the gradient vector, which the next step
        overwrites)."""
        flat = self._grad.buffer
        flat[self.lo:self.hi] = self.grad_block
        self.comm.allgather(flat, self.counts)
        return dict(self.grads)

    def update(self, apply):
        """apply(name, w_segment, dw_segment) for every parameter, in name order: flat views of this process's part
        of the parameter and of its summed gradient (empty when it has none); then the allgather of the parameters."""
        params = self.params
        for name in self.names:
            start, stop = self.segments[name]
            first = self.offsets[name]
            w = params[first + start:first + stop]
            dw = self.grad_block[first + start - self.lo:first + stop - self.lo] if stop > start else w[:0]
            apply(name, w, dw)
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
