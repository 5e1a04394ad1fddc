"""What every section of dpnet.bench shares: constants, timing helpers and the worker processes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

INPUT_SHAPE, NUM_CLASSES = (3, 32, 32), 10
SECTIONS = ("step", "torch", "distributed", "memory")
TORCH_HINT = "PyTorch is not installed: pip install torch==2.13.0 (takes a CPU build here)"
MPI_HINT = "needs mpi4py and mpiexec: pip install dpnet[mpi]"
LEARNING_RATES = {"sgd": 1e-4, "sgd_momentum": 1e-4, "rmsprop": 1e-4, "adam": 1e-4}
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")
_THREAD_VARS = ("DPNET_BLAS_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_REPO = Path(__file__).resolve().parents[2]  # the folder holding this dpnet package: on the workers' PYTHONPATH


def median_ms(values):
    return 1e3 * float(np.median(values))


def synthetic_batch(batch_size, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, *INPUT_SHAPE)).astype(dtype), rng.integers(NUM_CLASSES, size=batch_size)



def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start



def mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.is_file() else shutil.which("mpiexec")


def run_worker(kind, spec, folder, threads=None, processes=1, mpi=False):
    """Run `python -m dpnet.bench --worker kind` (under mpiexec -n processes when processes > 1 or mpi) with a clean
    environment (no launcher variables; thread counts set) and return what it wrote."""
    out = Path(folder) / f"{kind}-{time.perf_counter_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "dpnet.bench", "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)]
    if processes > 1 or mpi:
        command = [mpiexec(), "-n", str(processes), *command]
    result = subprocess.run(command, env=env, timeout=1800, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {kind} worker failed (exit {result.returncode}): {' '.join(command)}\n"
                           f"{result.stdout}{result.stderr}")
    return json.loads(out.read_text())


def _progress(message):
    print(message, file=sys.stderr, flush=True)


