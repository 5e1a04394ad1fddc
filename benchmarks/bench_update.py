"""The update rules alone, on the parameter shapes of FullyConnectedNet: which way of applying them is fastest.

    python benchmarks/bench_update.py [--hidden-dims 1024 1024] [--dtype float32] [--repeats 30]

For each rule, interleaved (median of --repeats rounds, each variant once per round, rotating the order):
- pure: the pure rule, rule(w, dw, config) -> next_w (allocates next_w and its temporaries)
- whole: rule.in_place on whole arrays (dpnet.optim.BLOCK_BYTES set beyond the largest array)
- blocks: rule.in_place as the Solver uses it (blocks of dpnet.optim.BLOCK_BYTES)
- blocks x2: the same, the two halves of each large array updated in two threads (NumPy releases the GIL inside its
  loops): an experiment, not what dpnet does. It can pay only when a core is idle during the update (one process
  whose BLAS threads wait); under load it measures nothing useful.
"""

import argparse
import itertools
import timeit
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dpnet import optim
from dpnet.classifiers.fc_net import FullyConnectedNet


def _halves(w, dw, config):
    """Two (w, dw, config) halves of flat views (state arrays too), for the two-thread experiment."""
    flat = {k: v.reshape(-1) for k, v in config.items() if isinstance(v, np.ndarray)}
    h = w.size // 2
    parts = []
    for part in (slice(0, h), slice(h, None)):
        sub = {k: (flat[k][part] if k in flat else v) for k, v in config.items()}
        parts.append((w.reshape(-1)[part], dw.reshape(-1)[part], sub))
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rules", nargs="+", default=["sgd", "sgd_momentum", "adam"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    model = FullyConnectedNet(args.hidden_dims, dtype=args.dtype, seed=0)
    rng = np.random.default_rng(0)
    grads = {k: (1e-3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in model.params.items()}
    size = sum(v.size for v in model.params.values())
    print(f"FullyConnectedNet({args.hidden_dims}) {args.dtype}: {size / 1e6:.2f} M parameters; median ms of "
          f"{args.repeats} interleaved rounds; BLOCK_BYTES {optim.BLOCK_BYTES}")
    pool = ThreadPoolExecutor(1)
    default_block = optim.BLOCK_BYTES
    for name in args.rules:
        rule = getattr(optim, name)
        params = {k: v.copy() for k, v in model.params.items()}
        configs = {variant: {k: {"learning_rate": 1e-4} for k in params}
                   for variant in ("pure", "whole", "blocks", "blocks x2")}

        def pure():
            for k in params:
                rule(params[k], grads[k], configs["pure"][k])

        def in_place(variant, block_bytes):
            def run():
                optim.BLOCK_BYTES = block_bytes
                for k in params:
                    rule.in_place(params[k], grads[k], configs[variant][k])
                optim.BLOCK_BYTES = default_block
            return run

        halves = configs["blocks x2"]
        for k in params:
            rule.in_place(params[k], grads[k], halves[k])  # creates the state arrays that the halves are views of
        split = {k: _halves(params[k], grads[k], halves[k]) for k in params
                 if params[k].size * params[k].itemsize >= 4 * default_block}

        def two_threads():
            for k in params:
                if k in split:
                    first, second = split[k]
                    other = pool.submit(rule.in_place, *second)
                    rule.in_place(*first)
                    other.result()
                else:
                    rule.in_place(params[k], grads[k], halves[k])

        variants = {"pure": pure, "whole": in_place("whole", 1 << 62), "blocks": in_place("blocks", default_block),
                    "blocks x2": two_threads}
        for run in variants.values():
            run()  # state arrays created, caches warm
        times = {v: [] for v in variants}
        order = list(variants)
        for r in range(args.repeats):
            for v in itertools.islice(itertools.cycle(order), r % len(order), r % len(order) + len(order)):
                times[v].append(timeit.timeit(variants[v], number=1))
        print(f"{name:13}" + "".join(f"  {v} {1e3 * np.median(t):6.2f}" for v, t in times.items()))


if __name__ == "__main__":
    main()
