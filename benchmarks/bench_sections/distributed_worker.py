"""Inside each process of a `distributed` job: timed training steps and their communication; fused vs pickled.

The step is the Solver's, driven through the public exchange protocol (see exchange_step): this process's shard of
the global minibatch drawn as the Solver draws it (an epoch's shuffle, sorted rows), bind, the model's loss into the
exchange's gradient views, reduce, update. What counts as communication:
- through MPI's collectives: the time inside the communicator's parameter-sized collectives (the fused gradient's
  Allreduce; sharded, the reduce-scatter and the allgather), measured by a communicator wrapper handed to the
  exchange (TimedCommunicator);
- through shared memory (the sums, copies and barriers happen inside the exchange, not in the communicator): the
  exchange's bind (sharded: a barrier) and reduce (the sums; sharded, also the summed block's norm), and its update
  less the time inside the rule's calls (what remains is the sharing: copies and barriers).
A rank waiting for a slower one counts as communication; the section reports the worst rank's share of the step.
"""

import time

import numpy as np

from .common import INPUT_SHAPE, NUM_CLASSES, timed
from .exchange_step import ExchangeStep


class TimedCommunicator:
    """`comm` with the seconds spent in its parameter-sized collectives (buffers of at least `min_size` elements)
    added up in `seconds`; everything else is passed through (dpnet accepts such a wrapper as a communicator)."""

    def __init__(self, comm, min_size):
        self.inner, self.min_size, self.seconds = comm, min_size, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, buf, call):
        if buf.size < self.min_size:
            return call()
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds += time.perf_counter() - start

    def allreduce(self, buf, op="sum"):
        return self._timed(buf, lambda: self.inner.allreduce(buf, op))

    def reduce_scatter(self, sendbuf, recvbuf, counts):
        return self._timed(sendbuf, lambda: self.inner.reduce_scatter(sendbuf, recvbuf, counts))

    def allgather(self, buf, counts):
        return self._timed(buf, lambda: self.inner.allgather(buf, counts))


def minibatches(X, y, batch, rank, size, seed=0):
    """This process's rows of every global minibatch, endlessly: each epoch a shuffle of all samples, cut into
    batches, each process taking its contiguous part of a batch, sorted (as the Solver draws them)."""
    rng = np.random.default_rng(seed)
    mine = slice(rank * batch // size, (rank + 1) * batch // size)
    while True:
        order = rng.permutation(len(y))
        for j in range(len(y) // batch):
            rows = np.sort(order[j * batch:(j + 1) * batch][mine])
            yield X[rows], y[rows]


def synthetic_data(batch, dtype, steps_per_epoch=8):
    rng = np.random.default_rng(0)
    n, input_dim = batch * steps_per_epoch, int(np.prod(INPUT_SHAPE))
    return rng.standard_normal((n, input_dim)).astype(dtype), rng.integers(NUM_CLASSES, size=n)


def worker_distributed(spec):
    """Train for warmup + repeats steps, timing every step, its communication and its reduce; rank 0 gets every
    rank's result (a list; [result] with one process, None on the other ranks)."""
    from dpnet.classifiers.fc_net import FullyConnectedNet
    from dpnet.parallel import SharedReplicatedExchange, SharedShardedExchange, get_communicator, set_blas_threads

    set_blas_threads(spec["threads"])
    comm = get_communicator()
    batch, warmup = spec["batch_size"], spec["warmup"]
    timed_comm = TimedCommunicator(comm, min_size=spec["gradient_size"] // 2)  # only gradients and parameters
    model = FullyConnectedNet(spec["hidden_dims"], dtype=np.dtype(spec["dtype"]), seed=0)
    step = ExchangeStep(model, spec["rule"], {"learning_rate": 1e-4}, comm=timed_comm,
                        shard=spec.get("shard_optimizer", False), shared_memory=spec.get("shared_memory", True))
    shared = isinstance(step.exchange, (SharedReplicatedExchange, SharedShardedExchange))
    X, y = synthetic_data(batch, spec["dtype"])
    batches = minibatches(X, y, batch, comm.rank, comm.size)
    exchange, params, now = step.exchange, model.params, time.perf_counter
    steps, comms, reduces = [], [], []
    for i in range(warmup + spec["repeats"]):
        timed_comm.seconds = step.apply_seconds = 0.0
        start = now()
        X_mine, y_mine = next(batches)
        bind = now()
        exchange.bind(params)
        bound = now()
        loss, grads = model.loss(X_mine, y_mine, grads=exchange.gradient_views(params))
        reduce = now()
        exchange.reduce(loss, grads, len(y_mine) / batch)
        update = now()
        exchange.update(params, step.configs, step.apply)
        end = now()
        if i >= warmup:
            steps.append(end - start)
            reduces.append(update - reduce)
            comms.append((bound - bind) + (update - reduce) + (end - update - step.apply_seconds) if shared
                         else timed_comm.seconds)
    step.release()
    result = dict(rank=comm.rank, steps=steps)
    if comm.size == 1:
        return [result]
    steps = np.array(steps)
    result.update(comm=comms, share=float(np.median(np.array(comms) / steps)), reduce=reduces,
                  reduce_share=float(np.median(np.array(reduces) / steps)), shared_memory=shared)
    if not spec.get("shard_optimizer") and not spec.get("shared_memory", True):
        result.update(compare_fused_and_pickled(comm, model, X[:batch], y[:batch], spec["allreduce_repeats"]))
        import mpi4py
        from mpi4py import MPI

        result.update(mpi4py=mpi4py.__version__, mpi=MPI.Get_library_version().strip().splitlines()[0])
    return comm.comm.gather(result, root=0)


def compare_fused_and_pickled(comm, model, X, y, repeats):
    """Interleaved timings of the fused in-place Allreduce (packing included; and the Allreduce call alone) and of
    one pickled allreduce (mpi4py's lower-case comm.allreduce) per gradient array."""
    from dpnet.parallel import FusedBuffer

    rows = slice(0, len(y) // comm.size)
    _, grads = model.loss(X[rows], y[rows])
    fused = FusedBuffer(grads, extra=1)
    times = {"fused": [], "reduce_only": [], "pickled": []}

    def run_pickled():
        for name in sorted(grads):
            comm.comm.allreduce(grads[name])

    order = (("fused", lambda: comm.allreduce(fused.pack(grads, 1 / comm.size))),
             ("reduce_only", lambda: comm.allreduce(fused.buffer)), ("pickled", run_pickled))
    for i in range(repeats + 2):
        for kind, run in order if i % 2 == 0 else order[::-1]:
            comm.barrier()
            seconds = timed(run)
            if i >= 2:  # the first two rounds are warm-up
                times[kind].append(seconds)
    return dict(**times, gradient_bytes=int(fused.buffer.nbytes), gradient_arrays=len(grads))
