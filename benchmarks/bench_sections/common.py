"""What every section shares: constants, the synthetic batch, medians, timings, progress lines."""

import sys
import time

import numpy as np

INPUT_SHAPE, NUM_CLASSES = (3, 32, 32), 10
SECTIONS = ("step", "torch", "distributed", "memory")
TORCH_HINT = "PyTorch is not installed: pip install torch==2.13.0 (takes a CPU build here)"
MPI_HINT = "needs mpi4py and mpiexec: pip install dpnet[mpi]"
LEARNING_RATES = {"sgd": 1e-4, "sgd_momentum": 1e-4, "rmsprop": 1e-4, "adam": 1e-4}


def median_ms(values):
    return 1e3 * float(np.median(values))


def synthetic_batch(batch_size, dtype, seed=1):
    """A CIFAR-shaped batch of normal noise and random labels: (X (N, 3, 32, 32) of dtype, y (N,))."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, *INPUT_SHAPE)).astype(dtype), rng.integers(NUM_CLASSES, size=batch_size)


def timed(fn):
    """Seconds that fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def progress(message):
    print(message, file=sys.stderr, flush=True)
