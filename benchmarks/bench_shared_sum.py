"""The gradient sum alone: dpnet.parallel.SharedSum against MPI's reduce-scatter, on one machine.

    mpiexec -n 2 python benchmarks/bench_shared_sum.py [--megabytes 7.4] [--dtype float32] [--repeats 60]

Every process holds a gradient vector of --megabytes (the size of FullyConnectedNet([512, 512])'s in float32 by
default) and its block of the weighted sum is computed three ways, interleaved, with a barrier before each timing:

- shared: SharedSum.sum_block (the vectors are shared memory; the weight is applied in the sum);
- reduce-scatter: MPICommunicator.reduce_scatter (MPI's Reduce_scatter_block), the vectors already scaled;
- scale + reduce-scatter: the vector scaled by the weight in place first, as the MPI exchanges do (they
  pack the gradients scaled by the weight).

Rank 0 prints the medians (slowest rank) after --warmup repetitions. Run it with 1 BLAS thread per process
(OPENBLAS_NUM_THREADS=1) on an otherwise idle machine.
"""

import argparse
import time

import numpy as np

from dpnet.parallel import SharedSum, get_communicator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=7.4, help="size of each process's gradient vector")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    comm = get_communicator()
    if comm.size < 2:
        parser.error("run it under mpiexec -n P with P >= 2")
    dtype = np.dtype(args.dtype)
    n = int(args.megabytes * 1e6 / dtype.itemsize) // comm.size * comm.size
    total = SharedSum.create(comm, {"gradient": np.zeros(n, dtype=dtype)})
    if total is None:
        parser.error("the processes cannot share memory (several machines, or too little room in /dev/shm)")
    weight = 1 / comm.size
    private = np.ones(n, dtype=dtype)
    block = np.empty(n // comm.size, dtype=dtype)
    counts = [n // comm.size] * comm.size

    def shared():
        total.vector.views["gradient"][...] = 1  # what the backward pass writes (not timed below)
        comm.barrier()
        start = time.perf_counter()
        total.sum_block(weight)
        total.sync()  # the barrier that ends a step, which the sum relies on
        return time.perf_counter() - start

    def reduce_scatter():
        comm.barrier()
        start = time.perf_counter()
        comm.reduce_scatter(private, block, counts)
        return time.perf_counter() - start

    def scale_and_reduce_scatter():
        comm.barrier()
        start = time.perf_counter()
        private.__imul__(dtype.type(weight))
        comm.reduce_scatter(private, block, counts)
        return time.perf_counter() - start

    cases = {"shared": shared, "reduce-scatter": reduce_scatter, "scale + reduce-scatter": scale_and_reduce_scatter}
    times = {name: [] for name in cases}
    for i in range(args.warmup + args.repeats):
        for name in list(cases) if i % 2 == 0 else list(cases)[::-1]:
            seconds = cases[name]()
            private[...] = 1
            if i >= args.warmup:
                times[name].append(seconds)
    medians = {name: np.array([np.median(t)], dtype=np.float64) for name, t in times.items()}
    for value in medians.values():
        comm.allreduce(value, op="max")
    if comm.rank == 0:
        print(f"{comm.size} processes, {n * dtype.itemsize / 1e6:.1f} MB of {dtype.name} each, medians of "
              f"{args.repeats} (slowest rank)")
        for name, value in medians.items():
            print(f"  {name:24s} {1e3 * value[0]:.3f} ms")
    total.free()


if __name__ == "__main__":
    main()
