"""Worker processes of the benchmarks, each in a process group of its own (killed whole on timeout or Ctrl-C).

A worker runs with a clean environment (no launcher variables, so that it does not think mpiexec started it; thread
counts set), with this checkout's folder on PYTHONPATH (it imports dpnet from here, whatever is installed) and
benchmarks/ as its script folder (it imports bench_sections from here). `run_worker` runs bench.py's workers
(`python benchmarks/bench.py --worker KIND`, alone or under mpiexec), which write their result as JSON to a file.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench.py"
REPO = BENCH.parents[1]  # the folder holding the dpnet package
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")
_THREAD_VARS = ("DPNET_BLAS_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
TIMEOUT = 1800  # seconds: a worker still running then is killed with its process group


def mpiexec():
    """The mpiexec next to this interpreter (the mpich wheel's), else the one on PATH, else None."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.is_file() else shutil.which("mpiexec")


def clean_environment(threads=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def run(command, threads=None, timeout=TIMEOUT):
    """Run `command` with clean_environment(threads) in a process group of its own, killed whole if the command
    outlives `timeout` seconds or this process is interrupted (no MPI rank is left behind). Returns its standard
    output; RuntimeError with its output if it fails."""
    process = subprocess.Popen(command, env=clean_environment(threads), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise RuntimeError(f"still running after {timeout} s, killed: {' '.join(command)}\n{stdout}{stderr}") from None
    except BaseException:  # Ctrl-C: the command has a session of its own, so it has to be ended here
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"failed (exit {process.returncode}): {' '.join(command)}\n{stdout}{stderr}")
    return stdout


def run_worker(kind, spec, folder, threads=None, processes=1, mpi=False):
    """Run the `kind` worker of bench.py on `spec` (under mpiexec -n processes when processes > 1 or mpi) and return
    what it wrote."""
    out = Path(folder) / f"{kind}-{time.perf_counter_ns()}.json"
    command = [sys.executable, str(BENCH), "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)]
    if processes > 1 or mpi:
        command = [mpiexec(), "-n", str(processes), *command]
    run(command, threads)
    return json.loads(out.read_text())
