"""Section `distributed`: one process against P MPI processes, and the share of the step spent communicating.

The jobs (1 x T BLAS threads, and P x T/P with the optimizer state replicated and sharded, each through shared
memory and through MPI's collectives alone) alternate in forward and reversed order round by round; each runs
distributed_worker in its processes.
"""

import importlib.util
import tempfile

import numpy as np

from .common import MPI_HINT, median_ms, progress
from .workers import mpiexec, run_worker

# name -> (shard_optimizer, shared_memory) of the P-process jobs
CASES = {"replicated": (False, True), "replicated_mpi": (False, False), "sharded": (True, True),
         "sharded_mpi": (True, False)}


def _run_jobs(args, spec):
    """{job name: [rank 0's list of every rank's result, one per round]}."""
    P, T = args.processes, args.threads
    jobs = {"serial": (1, T, False, True), **{name: (P, max(1, T // P), *how) for name, how in CASES.items()}}
    runs = {name: [] for name in jobs}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:  # ABBA
                p, t, shard, shared = jobs[name]
                progress(f"distributed section, round {r + 1}/{args.rounds}: {p} x {t} threads"
                         f"{', optimizer state sharded' if shard else ''}"
                         f"{', MPI collectives only' if p > 1 and not shared else ''}")
                runs[name].append(run_worker("distributed", dict(spec, threads=t, shard_optimizer=shard,
                                                                 shared_memory=shared), folder, threads=t,
                                             processes=p))
    return runs


def section_distributed(args):
    if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
        return dict(available=False, note=MPI_HINT)
    from dpnet.classifiers.fc_net import FullyConnectedNet

    gradient_size = sum(p.size for p in FullyConnectedNet(args.hidden_dims, dtype=np.float32).params.values())
    spec = dict(hidden_dims=args.hidden_dims, batch_size=args.batch_size, dtype="float32", rule=args.distributed_rule,
                warmup=args.warmup, repeats=args.repeats, allreduce_repeats=args.allreduce_repeats,
                gradient_size=gradient_size)
    runs = _run_jobs(args, spec)
    serial = [t for run in runs["serial"] for t in run[0]["steps"]]
    worst = lambda name, key: float(np.median([max(rank[key] for rank in run) for run in runs[name]]))  # noqa: E731
    cases = {}
    for name in CASES:
        steps = [t for run in runs[name] for t in run[0]["steps"]]
        cases[name] = dict(
            step_ms=median_ms(steps), speedup=float(np.median(serial) / np.median(steps)),
            step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs[name]],
            comm_share=worst(name, "share"), reduce_share=worst(name, "reduce_share"),
            comm_ms=median_ms([t for run in runs[name] for rank in run for t in rank["comm"]]),
            shared_memory=all(rank["shared_memory"] for run in runs[name] for rank in run))
    first = runs["replicated_mpi"][0][0]
    collect = lambda key: [t for run in runs["replicated_mpi"] for t in run[0][key]]  # noqa: E731
    return dict(
        available=True, processes=args.processes, threads=args.threads, rule=args.distributed_rule, dtype="float32",
        serial_step_ms=median_ms(serial),
        serial_step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs["serial"]], cases=cases,
        fused_ms=median_ms(collect("fused")), reduce_only_ms=median_ms(collect("reduce_only")),
        pickled_ms=median_ms(collect("pickled")),
        fused_speedup=float(np.median(collect("pickled")) / np.median(collect("fused"))),
        gradient_megabytes=first["gradient_bytes"] / 1e6, gradient_arrays=first["gradient_arrays"],
        mpi=first["mpi"], mpi4py=first["mpi4py"], runs=runs)
