"""Side-by-side measurements of dpnet's training step: `python benchmarks/bench.py` (from a checkout).

    python benchmarks/bench.py [--sections step torch distributed memory] [--hidden-dims 512 512] [--batch-size 256]
                               [--threads 2] [--repeats 50] [--rounds 2] [--data-dir DIR] [--json PATH]

Prints one table of four sections, each measured side by side in one run (medians over repeated steps after warm-up;
what is compared is interleaved, so that whatever else the machine does slows both alike). Every section uses dpnet's
public API only; the sections are the modules of benchmarks/bench_sections/.

- step: dpnet's training step on FullyConnectedNet(hidden dims), synthetic CIFAR-shaped batch: forward, backward and
  the update as the Solver takes them (the model's loss into the gradient exchange's buffer, then the exchange's
  update with the rule's in-place variant), against its BLAS floor, the time of exactly the matrix products the step
  performs (same shapes and dtype), the two alternating in this process. Target: step <= 1.10 x floor with sgd. With
  sgd a third contender runs in the same rotation: the step written out in plain NumPy without dpnet
  (bench_sections.step.handwritten_step), the reference for what a separate update pass allows.
- torch: dpnet against PyTorch on CPU for the same MLP, dtype, batch, threads and update rule (sgd_momentum with
  momentum 0.9, adam; PyTorch's default optimizer implementations), each in its own process (two thread pools in one
  process would spin against each other), alternating in ABBA rounds. PyTorch is optional: without it the rows say
  how to get it. Target: dpnet ahead (aim for 1.3x).
- distributed: the training step (float32, --distributed-rule, default sgd; the Solver's step driven through the
  public exchange protocol) as 1 process x T BLAS threads against P MPI processes x T/P threads, with the optimizer
  state replicated and sharded, each through shared memory (the default on one machine) and through MPI's
  collectives alone, alternating in forward and reversed order round by round. Inside each process the
  communication is timed where it happens: MPI's parameter-sized collectives (the fused gradient's Allreduce;
  sharded, the reduce-scatter and the allgather) through a communicator wrapper; in shared memory the exchange's
  sums, copies and barriers (its bind and reduce, and its update less the update rule's own time). A rank waiting for
  a slower one counts as communication; the share of the step is that of the worst rank. Also the fused in-place
  Allreduce (packing included) against one pickled allreduce per gradient array, interleaved. Target: communication
  <= 10% of the step at 2 processes.
- memory: peak RSS and peak PSS (proportional set size, /proc/<pid>/smaps_rollup: shared pages, such as the
  memory-mapped CIFAR-10 cache in the page cache, divided among the processes mapping them; RSS counts them in every
  process) of 1 and of 4 processes (mpiexec) training the command line's default model and recipe
  (dpnet.config.DEFAULTS: optimizer state sharded, parameters and gradients in shared memory) on the full CIFAR-10
  for one short epoch of a few dozen steps (its end included: evaluation, replica check, and the end of training;
  without monitors, as in a script, so nothing is gathered for them), and of 4 processes again with MPI's
  collectives alone (a copy of the parameters per process), and with the state replicated; and what each process
  beyond the first adds. The peak is also given for the training alone, before train() hands every process the
  trained model. Target: 4 processes <= 1.5 x one process.

This checkout's dpnet is measured, whatever else is installed: it comes first on sys.path here, and on PYTHONPATH in
the worker processes (`benchmarks/bench.py --worker`, started with a clean environment). With --json PATH everything
(per-step times included, and the environment: versions, BLAS, CPU, git commit, load average) is written there, to
compare runs across commits. Run on an otherwise idle machine; the load average is printed before and after.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's dpnet, which the workers import too

from bench_sections.common import SECTIONS, progress
from bench_sections.distributed import section_distributed
from bench_sections.distributed_worker import worker_distributed
from bench_sections.memory import section_memory, worker_memory
from bench_sections.report import environment, print_table, table_rows
from bench_sections.step import section_step
from bench_sections.versus_torch import section_torch, worker_framework

WORKERS = {"framework": worker_framework, "distributed": worker_distributed, "memory": worker_memory}
RUN = {"step": section_step, "torch": section_torch, "distributed": section_distributed, "memory": section_memory}


def worker_main(kind, spec, out):
    result = WORKERS[kind](json.loads(spec))
    if result is not None:  # None on the ranks other than 0
        Path(out).write_text(json.dumps(result))


def build_parser():
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512],
                        help="hidden layers of the MLP of every section but memory")
    parser.add_argument("--batch-size", type=int, default=256, help="(global) minibatch size")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    parser.add_argument("--rules", nargs="+", default=["sgd", "sgd_momentum", "adam"], help="update rules of 'step'")
    parser.add_argument("--torch-rules", nargs="+", choices=("sgd", "sgd_momentum", "adam"),
                        default=["sgd_momentum", "adam"], help="update rules of 'torch'")
    parser.add_argument("--threads", type=int, default=2, help="BLAS (and PyTorch) threads of one process")
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded before measuring")
    parser.add_argument("--repeats", type=int, default=50, help="steps measured per configuration (and round)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the torch and distributed sections")
    parser.add_argument("--processes", type=int, default=2, help="processes of the distributed section")
    parser.add_argument("--distributed-rule", default="sgd", help="update rule of the distributed section")
    parser.add_argument("--allreduce-repeats", type=int, default=30, help="fused/pickled Allreduce repetitions")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="CIFAR-10 for the memory section (None: $DPNET_DATA_DIR, else dpnet's data folder)")
    parser.add_argument("--memory-processes", type=int, nargs="+", default=[1, 4], help="jobs of the memory section")
    parser.add_argument("--memory-steps", type=int, default=40, help="training steps of each memory job")
    parser.add_argument("--memory-hidden-dims", type=int, nargs="+", default=None,
                        help="model of the memory section (default: the command line's, dpnet.config.DEFAULTS)")
    parser.add_argument("--json", type=Path, help="write the results (and per-step times) to this JSON file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.out)
    load_before = os.getloadavg()[0]
    results = dict(environment=environment(), config={k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items() if v is not None})
    for name in SECTIONS:
        if name in args.sections:
            progress(f"measuring: {name}")
            results[name] = RUN[name](args)
    results["environment"]["load_average"] = [load_before, os.getloadavg()[0]]
    env = results["environment"]
    print(f"bench.py {' '.join(args.sections)}: FullyConnectedNet({args.hidden_dims}), batch {args.batch_size}, "
          f"{args.threads} threads; medians of {args.repeats} steps after {args.warmup} warm-up (x {args.rounds} "
          f"ABBA rounds for torch and distributed)")
    print(f"load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {env['cpus']} CPUs "
          f"({env.get('cpu') or 'unknown CPU'}; anything else running makes these figures noisy)")
    print_table(table_rows(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
