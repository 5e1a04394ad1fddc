"""Data-parallel training on one machine: the `distributed` section of `python -m dpnet.bench`.

    python benchmarks/bench_distributed.py [--rounds 5] [--steps 40] [--warmup 5] [--repeats 30] [--processes 2]
                                           [--threads 2] [--hidden-dims 512 512] [--batch-size 256]

1 process x T BLAS threads against P MPI processes x T/P threads (optimizer state replicated and sharded, through
shared memory and through MPI alone), alternating round by round (ABBA), training FullyConnectedNet (float32, sgd,
synthetic data) with the Solver; the communication share of the step (worst rank), and the fused in-place Allreduce
against one pickled allreduce per gradient array. Writes the results to
benchmarks/results/bench_distributed-<time>.json. Target: communication <= 10% of the step at 2 processes.
"""

import argparse
import time
from pathlib import Path

from dpnet import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each configuration (5)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run (40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded at the start of each run (5)")
    parser.add_argument("--repeats", type=int, default=30, help="fused/pickled allreduce repetitions per run (30)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel configuration (2)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads of the single process (2)")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.steps < 30:
        parser.error("--steps must be at least 30 (medians over fewer steps are noise)")
    path = RESULTS / f"bench_distributed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    bench.main(["--sections", "distributed", "--rounds", str(args.rounds), "--repeats", str(args.steps),
                "--warmup", str(args.warmup), "--allreduce-repeats", str(args.repeats), "--processes",
                str(args.processes), "--threads", str(args.threads), "--hidden-dims", *map(str, args.hidden_dims),
                "--batch-size", str(args.batch_size), "--json", str(path)])


if __name__ == "__main__":
    main()
