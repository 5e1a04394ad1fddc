"""Section 3 of dpnet.bench: one process against P MPI processes, and the share of the step spent communicating."""

import importlib.util
import tempfile
import time

import numpy as np

from .common import (INPUT_SHAPE, MPI_HINT, NUM_CLASSES, _progress, median_ms, mpiexec, run_worker,
                     timed)


def worker_distributed(spec):
    """Inside each process of a job: train with the Solver, timing every step and its communication: MPI's
    parameter-sized collectives (the fused gradient's Allreduce; sharded, the reduce-scatter and the allgather) or,
    in shared memory, the sums and copies of dpnet.shared_sum, the copies of activations into shared memory of
    dpnet.factored_grads (not its products, which replace the whole gradients' products) and every barrier."""
    from ..classifiers.fc_net import FullyConnectedNet
    from ..distributed import NodeSharedArray, get_communicator, set_blas_threads
    from ..factored_grads import FactoredGradients
    from ..shared_sum import SharedSum
    from ..solver import Solver

    set_blas_threads(spec["threads"])
    comm = get_communicator()
    step_times, comm_times, solver_allreduce_times = [], [], []
    big = spec["gradient_size"] // 2  # only the gradient and parameter buffers are this large (others: a few counts)
    in_step = [0.0]  # time spent communicating during the current step
    depth = [0]  # a timed call inside a timed call (a barrier inside a sum) is not counted twice

    def count_as_communication(call, *args, **kwargs):
        if depth[0]:
            return call(*args, **kwargs)
        depth[0] += 1
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            in_step[0] += time.perf_counter() - start
            depth[0] -= 1

    def timed_collective(call, buf, *args):
        if buf.size < big:
            return call(buf, *args)
        return count_as_communication(call, buf, *args)

    class TimedComm:
        """The communicator, with the time of its parameter-sized collectives recorded."""

        def __getattr__(self, name):
            return getattr(comm, name)

        def allreduce(self, buf, op="sum"):
            return timed_collective(comm.allreduce, buf, op)

        def reduce_scatter(self, sendbuf, recvbuf, counts):
            timed_collective(lambda b, *a: comm.reduce_scatter(b, recvbuf, counts), sendbuf)
            return recvbuf

        def allgather(self, buf, counts):
            return timed_collective(comm.allgather, buf, counts)

    # In this worker process only: shared memory's sums, copies and barriers replace collectives, so they count.
    def timed_method(method):
        return lambda self, *args, **kwargs: count_as_communication(method, self, *args, **kwargs)

    for cls, name in ((NodeSharedArray, "sync"), (SharedSum, "sum_block"), (SharedSum, "gather"),
                      (FactoredGradients, "receive")):
        setattr(cls, name, timed_method(getattr(cls, name)))

    class WholeGradientsNet(FullyConnectedNet):
        """The model, without weight_factors: each process computes whole gradients (summed: dpnet.shared_sum)."""

        def loss(self, X, y=None, grads=None):
            return super().loss(X, y, grads=grads)

    class TimedSolver(Solver):
        shared_memory_was_used = factored = False

        def _step(self):
            in_step[0] = 0.0
            start = time.perf_counter()
            result = super()._step()
            self.shared_memory_was_used |= (self._shared_sum is not None
                                            or self._shards is not None and self._shards.shared)
            self.factored |= self._shards is not None and self._shards.factored
            step_times.append(time.perf_counter() - start)
            comm_times.append(in_step[0])
            return result

        def _allreduce(self, *args):
            start = time.perf_counter()
            result = super()._allreduce(*args)
            solver_allreduce_times.append(time.perf_counter() - start)
            return result

    batch, dtype = spec["batch_size"], np.dtype(spec["dtype"])
    steps_per_epoch = 8
    rng = np.random.default_rng(0)
    n_train = batch * steps_per_epoch
    input_dim = int(np.prod(INPUT_SHAPE))
    data = dict(X_train=rng.standard_normal((n_train, input_dim)).astype(dtype),
                y_train=rng.integers(NUM_CLASSES, size=n_train),
                X_val=rng.standard_normal((batch, input_dim)).astype(dtype),
                y_val=rng.integers(NUM_CLASSES, size=batch))
    model = (FullyConnectedNet if spec.get("factors", True) else WholeGradientsNet)(spec["hidden_dims"], dtype=dtype,
                                                                                      seed=0)
    total = spec["warmup"] + spec["repeats"]
    solver = TimedSolver(model, data, update_rule=spec["rule"], optim_config={"learning_rate": 1e-4},
                         batch_size=batch, num_epochs=-(-total // steps_per_epoch), num_train_samples=batch, seed=0,
                         comm=TimedComm() if comm.size > 1 else comm, verbose=False,
                         shard_optimizer=spec.get("shard_optimizer", False),
                         shared_memory=spec.get("shared_memory", True))
    solver.train()
    steps = np.array(step_times[spec["warmup"]:total])
    result = dict(rank=comm.rank, steps=steps.tolist())
    if comm.size == 1:
        return [result]
    reduces = np.array(comm_times[spec["warmup"]:total])
    result.update(allreduce=reduces.tolist(), share=float(np.median(reduces / steps)),
                  shared_memory=bool(solver.shared_memory_was_used), factored=bool(solver.factored))
    if spec.get("shard_optimizer"):
        return comm.comm.gather(result, root=0)
    packed = np.array(solver_allreduce_times[spec["warmup"]:total])
    result.update(solver_allreduce=packed.tolist(), solver_share=float(np.median(packed / steps)))
    if spec.get("shared_memory", True):
        return comm.comm.gather(result, root=0)
    result.update(compare_fused_and_pickled(comm, model, data, spec["allreduce_repeats"]))
    import mpi4py

    result.update(mpi4py=mpi4py.__version__, mpi=comm._MPI.Get_library_version().strip().splitlines()[0])
    return comm.comm.gather(result, root=0)


def compare_fused_and_pickled(comm, model, data, repeats):
    """Interleaved timings of the fused in-place Allreduce (packing included; and the Allreduce call alone) and of
    one pickled allreduce (mpi4py's lower-case comm.allreduce) per gradient array."""
    from ..distributed import FusedBuffer

    rows = slice(0, len(data["y_val"]) // comm.size)
    _, grads = model.loss(data["X_train"][rows], data["y_train"][rows])
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


# name -> (shard_optimizer, shared_memory, weight factors) of the P-process jobs of the distributed section
DISTRIBUTED_CASES = {"replicated": (False, True, True), "replicated_mpi": (False, False, True),
                     "sharded": (True, True, True), "sharded_summed": (True, True, False),
                     "sharded_mpi": (True, False, True)}


def section_distributed(args):
    if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
        return dict(available=False, note=MPI_HINT)
    P, T = args.processes, args.threads
    t = max(1, T // P)
    configs = {"serial": (1, T, False, True, True), **{name: (P, t, *how) for name, how in DISTRIBUTED_CASES.items()}}
    from ..classifiers.fc_net import FullyConnectedNet

    gradient_size = sum(p.size for p in FullyConnectedNet(args.hidden_dims, dtype=np.float32).params.values())
    spec = dict(hidden_dims=args.hidden_dims, batch_size=args.batch_size, dtype="float32", rule=args.distributed_rule,
                warmup=args.warmup, repeats=args.repeats, allreduce_repeats=args.allreduce_repeats,
                gradient_size=gradient_size)
    runs = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:  # ABBA
                p, t, shard, shared, factors = configs[name]
                _progress(f"distributed section, round {r + 1}/{args.rounds}: {p} x {t} threads"
                          f"{', optimizer state sharded' if shard else ''}"
                          f"{', MPI collectives only' if p > 1 and not shared else ''}"
                          f"{', whole gradients summed' if shard and shared and not factors else ''}")
                runs[name].append(run_worker("distributed", dict(spec, threads=t, shard_optimizer=shard,
                                                                 shared_memory=shared, factors=factors),
                                             folder, threads=t, processes=p))
    serial = [t for run in runs["serial"] for t in run[0]["steps"]]
    cases = {}
    for name in DISTRIBUTED_CASES:
        steps = [t for run in runs[name] for t in run[0]["steps"]]
        cases[name] = dict(
            step_ms=median_ms(steps), speedup=float(np.median(serial) / np.median(steps)),
            step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs[name]],
            comm_share=float(np.median([max(rank["share"] for rank in run) for run in runs[name]])),
            comm_ms=median_ms([t for run in runs[name] for rank in run for t in rank["allreduce"]]),
            shared_memory=all(rank["shared_memory"] for run in runs[name] for rank in run),
            factored=all(rank["factored"] for run in runs[name] for rank in run))
        if not DISTRIBUTED_CASES[name][0]:  # replicated: all of Solver._allreduce (packing included) too
            cases[name]["solver_allreduce_share"] = float(np.median(
                [max(rank["solver_share"] for rank in run) for run in runs[name]]))
    first = runs["replicated_mpi"][0][0]
    collect = lambda key: [t for run in runs["replicated_mpi"] for t in run[0][key]]  # noqa: E731
    return dict(
        available=True, processes=P, threads=T, rule=args.distributed_rule, dtype="float32",
        serial_step_ms=median_ms(serial),
        serial_step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs["serial"]], cases=cases,
        fused_ms=median_ms(collect("fused")), reduce_only_ms=median_ms(collect("reduce_only")),
        pickled_ms=median_ms(collect("pickled")),
        fused_speedup=float(np.median(collect("pickled")) / np.median(collect("fused"))),
        gradient_megabytes=first["gradient_bytes"] / 1e6, gradient_arrays=first["gradient_arrays"],
        mpi=first["mpi"], mpi4py=first["mpi4py"], runs=runs)


