"""One training step of FullyConnectedNet against its BLAS floor: the `step` section of `python -m dpnet.bench`.

The step is `model.loss(X, y)` plus the Solver's update of every parameter (in place for the built-in rules); the
floor is the time of exactly the matrix products that the step performs, at the same shapes and dtype. The two are
timed alternately in one process and the medians are compared (see dpnet/bench/step.py).

    python benchmarks/bench_step.py [--hidden-dims 512 512] [--batch-size 256] [--rules sgd] [--threads 2]
                                    [--repeats 60] [--json PATH]
"""

import argparse

from dpnet import bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rules", nargs="+", default=["sgd"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    bench.main(["--sections", "step", "--hidden-dims", *map(str, args.hidden_dims), "--batch-size",
                str(args.batch_size), "--rules", *args.rules, "--threads", str(args.threads), "--repeats",
                str(args.repeats), *(["--json", args.json] if args.json else [])])


if __name__ == "__main__":
    main()
