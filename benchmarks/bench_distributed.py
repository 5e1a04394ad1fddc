"""Data-parallel training on one machine: 1 process x T BLAS threads against P processes x T/P threads.

    python benchmarks/bench_distributed.py [--rounds 5] [--steps 40] [--warmup 5] [--processes 2] [--threads 2]

Side by side in one run (the two configurations alternate, round by round, in ABBA order, so that whatever else the
machine is doing slows both alike): the Solver training FullyConnectedNet([512, 512]) on synthetic data (input dim
3072, 10 classes, float32, sgd, global batch 256). Inside every process it times each step (Solver._step) and the
MPI_Allreduce of the fused gradient buffer within it (a timing wrapper around the communicator's allreduce), so the
communication share is measured where it happens (time spent waiting for a slower rank counts as communication).
Then, in the P-process job, it compares the Solver's fused in-place Allreduce of the whole gradient (packing
included) with reducing the gradients one pickled object at a time (mpi4py's lower-case comm.allreduce per array),
interleaving the two. Prints a table and writes everything to benchmarks/results/bench_distributed-<time>.json.
Targets (from the data-parallel issue): Allreduce share <= 10% of the step at 2 processes; fused >= 5x faster.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INPUT_DIM, CLASSES, BATCH = [512, 512], 3072, 10, 256
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")
_THREAD_VARS = ("DPNET_BLAS_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ----------------------------------------------------------------------------------------------- inside each job
def worker(args):
    from dpnet.classifiers.fc_net import FullyConnectedNet
    from dpnet.distributed import FusedBuffer, get_communicator, set_blas_threads
    from dpnet.solver import Solver

    set_blas_threads(args.threads)
    comm = get_communicator()
    step_times, allreduce_times, fused_times = [], [], []

    class TimedComm:
        """The communicator, with the time of each large allreduce recorded."""

        def __getattr__(self, name):
            return getattr(comm, name)

        def allreduce(self, buf, op="sum"):
            start = time.perf_counter()
            comm.allreduce(buf, op)
            if buf.size >= 1000:  # the fused gradient buffer (the others hold a few counts or hashes)
                allreduce_times.append(time.perf_counter() - start)
            return buf

    class TimedSolver(Solver):
        def _step(self):
            start = time.perf_counter()
            result = super()._step()
            step_times.append(time.perf_counter() - start)
            return result

        def _allreduce(self, *args):
            start = time.perf_counter()
            result = super()._allreduce(*args)
            fused_times.append(time.perf_counter() - start)
            return result

    steps_per_epoch = 8
    rng = np.random.default_rng(0)
    n_train = BATCH * steps_per_epoch
    data = dict(X_train=rng.standard_normal((n_train, INPUT_DIM), dtype=np.float32),
                y_train=rng.integers(CLASSES, size=n_train), X_val=rng.standard_normal((BATCH, INPUT_DIM),
                                                                                     dtype=np.float32),
                y_val=rng.integers(CLASSES, size=BATCH))
    model = FullyConnectedNet(HIDDEN, input_dim=INPUT_DIM, num_classes=CLASSES, dtype=np.float32, seed=0)
    total = args.warmup + args.steps
    solver = TimedSolver(model, data, update_rule="sgd", optim_config={"learning_rate": 1e-3}, batch_size=BATCH,
                         num_epochs=-(-total // steps_per_epoch), num_train_samples=BATCH, seed=0,
                         comm=TimedComm() if comm.size > 1 else comm, verbose=False)
    solver.train()
    steps = np.array(step_times[args.warmup:total])
    result = dict(rank=comm.rank, steps=steps.tolist())
    if comm.size > 1:
        reduces = np.array(allreduce_times[args.warmup:total])
        packed = np.array(fused_times[args.warmup:total])
        result.update(allreduce=reduces.tolist(), share=float(np.median(reduces / steps)),
                      solver_allreduce=packed.tolist(), solver_share=float(np.median(packed / steps)))
        result.update(compare_fused_and_pickled(comm, model, data, FusedBuffer, args.repeats))
        results = comm.comm.gather(result, root=0)
    else:
        results = [result]
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(results))


def compare_fused_and_pickled(comm, model, data, FusedBuffer, repeats):
    """Interleaved timings of the fused in-place Allreduce (packing included; and without packing: the Allreduce call
    alone) and of one pickled allreduce per array."""
    rows = slice(0, BATCH // comm.size)
    _, grads = model.loss(data["X_train"][rows], data["y_train"][rows])
    fused = FusedBuffer(grads, extra=1)
    mpi = comm.comm  # the mpi4py communicator underneath
    times = {"fused": [], "reduce_only": [], "pickled": []}

    def run_fused():
        comm.allreduce(fused.pack(grads, 1 / comm.size))

    def run_reduce_only():
        comm.allreduce(fused.buffer)

    def run_pickled():
        for name in sorted(grads):
            mpi.allreduce(grads[name])

    for i in range(repeats + 2):
        order = (("fused", run_fused), ("reduce_only", run_reduce_only), ("pickled", run_pickled))
        for kind, run in order if i % 2 == 0 else order[::-1]:
            comm.barrier()
            start = time.perf_counter()
            run()
            if i >= 2:  # the first two rounds are warm-up
                times[kind].append(time.perf_counter() - start)
    return dict(**times, gradient_bytes=int(fused.buffer.nbytes), gradient_arrays=len(grads))


# ----------------------------------------------------------------------------------------------- the driver
def mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.is_file() else shutil.which("mpiexec")
    if found is None:
        sys.exit("bench_distributed: no mpiexec next to the interpreter nor on PATH (pip install dpnet[mpi])")
    return found


def launch(processes, threads, args, folder, tag):
    out = Path(folder) / f"{tag}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _THREAD_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if processes > 1:
        command = [mpiexec(), "-n", str(processes), *command]
    subprocess.run(command, env=env, check=True, timeout=900)
    return json.loads(out.read_text())


def median_ms(values):
    return 1e3 * float(np.median(values))


def main(args):
    P, T = args.processes, args.threads
    configs = {"serial": (1, T), "parallel": (P, max(1, T // P))}
    runs = {name: [] for name in configs}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            names = list(configs) if r % 2 == 0 else list(configs)[::-1]  # ABBA: drift hits both alike
            for name in names:
                print(f"round {r + 1}/{args.rounds}: {name} ({configs[name][0]} x {configs[name][1]} threads)",
                      file=sys.stderr, flush=True)
                runs[name].append(launch(*configs[name], args, folder, f"{name}-{r}"))

    serial_steps = [t for run in runs["serial"] for t in run[0]["steps"]]
    parallel_steps = [t for run in runs["parallel"] for t in run[0]["steps"]]
    shares = [max(rank["share"] for rank in run) for run in runs["parallel"]]
    fused = [t for run in runs["parallel"] for t in run[0]["fused"]]
    pickled = [t for run in runs["parallel"] for t in run[0]["pickled"]]
    reduce_only = [t for run in runs["parallel"] for t in run[0]["reduce_only"]]
    summary = dict(
        serial_step_ms=median_ms(serial_steps), parallel_step_ms=median_ms(parallel_steps),
        serial_step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs["serial"]],
        parallel_step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs["parallel"]],
        speedup=float(np.median(serial_steps) / np.median(parallel_steps)),
        allreduce_share_per_round=shares, allreduce_share=float(np.median(shares)),
        solver_allreduce_share=float(np.median([max(rank["solver_share"] for rank in run)
                                                for run in runs["parallel"]])),
        allreduce_ms=median_ms([t for run in runs["parallel"] for rank in run for t in rank["allreduce"]]),
        fused_ms=median_ms(fused), pickled_ms=median_ms(pickled), reduce_only_ms=median_ms(reduce_only),
        fused_speedup=float(np.median(pickled) / np.median(fused)),
        gradient_megabytes=runs["parallel"][0][0]["gradient_bytes"] / 1e6,
        gradient_arrays=runs["parallel"][0][0]["gradient_arrays"],
        load_average=[load_before, os.getloadavg()[0]],
    )
    print_table(summary, P, T, args)
    save(summary, runs, args)


def print_table(s, P, T, args):
    per_round = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    print(f"\nFullyConnectedNet({HIDDEN}) float32, input {INPUT_DIM}, global batch {BATCH}, sgd; medians of "
          f"{args.steps} steps after {args.warmup} warm-up x {args.rounds} interleaved rounds")
    print(f"load average (1 min) before / after: {s['load_average'][0]:.2f} / {s['load_average'][1]:.2f} on "
          f"{os.cpu_count()} CPUs: anything else running makes these figures noisy")
    print(f"{'configuration':34} {'step (ms)':>10} {'per round (ms)':>22} {'samples/s':>10}")
    for name, (p, t), key in (("serial", (1, T), "serial_step_ms"), ("parallel", (P, max(1, T // P)),
                                                                     "parallel_step_ms")):
        label = f"{p} process{'es' if p > 1 else ''} x {t} BLAS thread{'s' if t > 1 else ''}"
        print(f"{label:34} {s[key]:10.2f} {per_round(s[key + '_per_round']):>22} {BATCH / s[key] * 1e3:10.0f}")
    print(f"speed-up of {P} processes: {s['speedup']:.2f}x")
    print(f"Allreduce of the fused gradient ({s['gradient_megabytes']:.1f} MB): {s['allreduce_ms']:.2f} ms, "
          f"{100 * s['allreduce_share']:.1f}% of the step (worst rank; per round: "
          f"{', '.join(f'{100 * v:.1f}%' for v in s['allreduce_share_per_round'])}) [target <= 10%]; "
          f"with packing (all of Solver._allreduce): {100 * s['solver_allreduce_share']:.1f}%")
    print(f"fused in-place Allreduce (packing included): {s['fused_ms']:.2f} ms; pickled allreduce of the "
          f"{s['gradient_arrays']} arrays one by one: {s['pickled_ms']:.2f} ms -> fused is {s['fused_speedup']:.1f}x "
          f"faster [target >= 5x]; the Allreduce call alone (no packing): {s['reduce_only_ms']:.2f} ms, "
          f"{s['pickled_ms'] / s['reduce_only_ms']:.1f}x faster than pickled")


def save(summary, runs, args):
    import mpi4py
    from mpi4py import MPI

    folder = REPO / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench_distributed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    environment = dict(python=platform.python_version(), numpy=np.__version__, mpi4py=mpi4py.__version__,
                       mpi=MPI.Get_library_version().strip().splitlines()[0], machine=platform.machine(),
                       cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                       load_average=os.getloadavg(), OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE"))
    path.write_text(json.dumps(dict(arguments=vars(args), environment=environment, summary=summary, runs=runs),
                               indent=1))
    print(f"results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each configuration (5)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run (40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded at the start of each run (5)")
    parser.add_argument("--repeats", type=int, default=30, help="fused/pickled allreduce repetitions per run (30)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel configuration (2)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads of the single process (2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.steps < 30:
        parser.error("--steps must be at least 30 (medians over fewer steps are noise)")
    worker(arguments) if arguments.worker else main(arguments)
