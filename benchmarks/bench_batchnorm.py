"""batchnorm_backward (node by node through the graph) against batchnorm_backward_alt (closed form), same cache.

    python benchmarks/bench_batchnorm.py [--shape 256 512] [--repeats 200]
"""

import argparse

import numpy as np
import timeit

from dpnet.layers import batchnorm_backward, batchnorm_backward_alt, batchnorm_forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[256, 512])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"batchnorm backward, x of shape {tuple(args.shape)}, median of 7 rounds of {args.repeats} calls")
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        x, dout = (rng.standard_normal(args.shape).astype(dtype) for _ in range(2))
        D = args.shape[1]
        _, cache = batchnorm_forward(x, np.ones(D, dtype), np.zeros(D, dtype), {"mode": "train"})
        times = {}
        for _ in range(7):  # alternate the two so that noise hits both alike
            for fn in (batchnorm_backward, batchnorm_backward_alt):
                seconds = timeit.timeit(lambda: fn(dout, cache), number=args.repeats) / args.repeats
                times.setdefault(fn.__name__, []).append(seconds)
        graph, alt = (np.median(times[n]) * 1e6 for n in ("batchnorm_backward", "batchnorm_backward_alt"))
        print(f"{np.dtype(dtype).name:8} graph {graph:8.1f} us   alt {alt:8.1f} us   speed-up {graph / alt:.2f}x")


if __name__ == "__main__":
    main()
