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

    Parameters are laid out by sorted name. `params` is the flat parameter vector; bind() makes the model's parameter
    arrays views of it. `grads` maps names to views of the flat gradient vector, for the model to write into.
    `segments[name]` is (start, stop) of this process's part of that parameter, in the parameter's flattened order
    (start == stop when it has none).
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
        sizes = [int(np.prod(self.shapes[name])) for name in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0, *sizes[:-1]]).tolist()))
        self.size = sum(sizes)
        block = -(-self.size // comm.size)  # the last block ends with padding that no parameter uses
        self.counts = [block] * comm.size
        self.lo = block * comm.rank
        self.hi = self.lo + block
        self.segments = {}
        for name, size in zip(self.names, sizes):
            start = min(max(self.lo - self.offsets[name], 0), size)
            self.segments[name] = (start, max(start, min(self.hi - self.offsets[name], size)))
        self.params = None
        self._grad_flat = np.zeros(block * comm.size, dtype=self.dtype)
        self.grads = self._views(self._grad_flat)
        self.grad_block = np.empty(self.counts[comm.rank], dtype=self.dtype)

    def _views(self, flat):
        return {name: flat[self.offsets[name]:self.offsets[name] + int(np.prod(shape))].reshape(shape)
                for name, shape in self.shapes.items()}

    def matches(self, model_params):
        return (sorted(model_params) == self.names
                and all(model_params[name].shape == shape for name, shape in self.shapes.items())
                and np.result_type(*(w.dtype for w in model_params.values())) == self.dtype)

    def bind(self, model_params):
        """Make model_params' arrays views of the flat parameter vector, copying in any array that is not one (a new
        model, use_params, a restored checkpoint). Arrays held elsewhere are copied, never changed."""
        if self.params is None:
            self.params = np.zeros(sum(self.counts), dtype=self.dtype)
            self._param_views = self._views(self.params)
        for name, view in self._param_views.items():
            if model_params[name] is not view:
                view[...] = model_params[name]
                model_params[name] = view

    def release_params(self):
        """Hand the flat parameter vector over to whoever holds the model's arrays now (final_params): the next
        bind() lays out a new one."""
        self.params = None

    def reduce(self, loss, weight, local_grads):
        """Sum weight * local gradients over the processes into this process's block; return (summed loss, norm of
        the summed gradient). local_grads are copied into the gradient vector unless they are its views already."""
        for name, view in self.grads.items():
            if local_grads[name] is not view:
                np.multiply(local_grads[name], weight, out=view)
            elif weight != 1:
                view *= weight
        self.comm.reduce_scatter(self._grad_flat, self.grad_block, self.counts)
        scalars = np.array([loss * weight, float(np.vdot(self.grad_block, self.grad_block))], dtype=np.float64)
        self.comm.allreduce(scalars)
        return scalars[0], float(np.sqrt(scalars[1]))

    def gather_grads(self):
        """Collective: the whole summed gradient, as views by name (of the gradient vector, which the next step
        overwrites)."""
        self._grad_flat[self.lo:self.hi] = self.grad_block
        self.comm.allgather(self._grad_flat, self.counts)
        return dict(self.grads)

    def update(self, apply):
        """apply(name, w_segment, dw_segment) for every parameter, in name order: flat views of this process's part
        of the parameter and of its summed gradient (empty when it has none); then the allgather of the parameters."""
        for name in self.names:
            start, stop = self.segments[name]
            first = self.offsets[name]
            w = self.params[first + start:first + stop]
            dw = self.grad_block[first + start - self.lo:first + stop - self.lo] if stop > start else w[:0]
            apply(name, w, dw)
        self.comm.allgather(self.params, self.counts)

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
