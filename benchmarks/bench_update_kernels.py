"""Would a fused update kernel beat dpnet's NumPy update inside the training step?

    python benchmarks/bench_update_kernels.py [--dtypes float32 float64] [--rules sgd sgd_momentum adam]
                                              [--kernels numpy numexpr numexpr-x2 numba numba-x2] [--rounds 2]

dpnet's update rules (dpnet.optim) are NumPy: a few ufunc passes per cache-sized block, on one core. This measures,
inside the training step of FullyConnectedNet([512, 512]) at batch 256 with 2 BLAS threads (the step section of
benchmarks/bench.py: the Solver's step through the public gradient-exchange protocol, on the same batch each step),
what the update takes with other kernels:
- numpy: dpnet's built-in in-place rule, as the Solver runs it;
- numexpr, numexpr-x2: the rule as numexpr expressions (one per array it writes), on 1 and on 2 threads;
- numba, numba-x2: the rule as one fused loop compiled by numba, on 1 thread, and in parallel (prange) on 2.

Each kernel runs in processes of its own, one per round, the order of the kernels alternating between rounds: a
kernel's thread pool would disturb the others' figures in a shared process. A row gives medians over the steps of all
rounds: the update (the rule's calls), the rest of the step (forward and backward) and the whole step; then the
largest difference of the kernel's update from the built-in rule's over two steps, relative to the array's largest
element; and the process's PSS after its steps. Last, what a kernel's package costs in memory: the PSS summed over 1
and over 4 idle processes that loaded dpnet and the package and ran the kernel once. numexpr and numba are optional:
a kernel whose package is missing is reported so (pip install numexpr==2.14.2 numba==0.68.0).
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_sections.common import median_ms, synthetic_batch
from bench_sections.memory import memory_now
from bench_sections.workers import clean_environment, run

KERNELS = ("numpy", "numexpr", "numexpr-x2", "numba", "numba-x2")
PACKAGE = {"numexpr": "numexpr", "numexpr-x2": "numexpr", "numba": "numba", "numba-x2": "numba"}
HYPER = {"sgd": dict(learning_rate=1e-4), "sgd_momentum": dict(learning_rate=1e-4, momentum=0.9),
         "adam": dict(learning_rate=1e-4, beta1=0.9, beta2=0.999, epsilon=1e-8)}
STATE = {"sgd": (), "sgd_momentum": ("velocity",), "adam": ("m", "v")}


def _adam_scalars(config):
    """beta1, 1 - beta1, beta2, 1 - beta2, eps, rate of this step, as dpnet.optim's adam computes them (the bias
    corrections folded into two scalars); increments config['t']."""
    config["t"] = config.get("t", 0) + 1
    beta1, beta2, t = config["beta1"], config["beta2"], config["t"]
    root_c2 = math.sqrt(1 - beta2**t)
    return (beta1, 1 - beta1, beta2, 1 - beta2, config["epsilon"] * root_c2,
            config["learning_rate"] * root_c2 / (1 - beta1**t))


def _prepared(rule, w, config):
    """config with its hyper-parameters and (zero) state arrays filled in; the flat views of those arrays."""
    for key, value in HYPER[rule].items():
        config.setdefault(key, value)
    for key in STATE[rule]:
        if config.get(key) is None:
            config[key] = np.zeros_like(w)
    return [config[key].reshape(-1) for key in STATE[rule]]


def numexpr_kernel(rule):
    """rule's in-place update as numexpr expressions: the scalars typed like w, so that float32 stays float32."""
    import numexpr

    def update(w, dw, config=None, w_scale=1.0):
        config = {} if config is None else config
        state = _prepared(rule, w, config)
        cast = w.dtype.type
        flat = dict(w=w.reshape(-1), dw=dw.reshape(-1))
        if rule == "sgd":
            numexpr.evaluate("w - lr * dw", dict(flat, lr=cast(config["learning_rate"])), out=flat["w"])
        elif rule == "sgd_momentum":
            (v,) = state
            numexpr.evaluate("mu * v - lr * dw", dict(flat, v=v, mu=cast(config["momentum"]),
                                                      lr=cast(config["learning_rate"])), out=v)
            numexpr.evaluate("w + v", dict(flat, v=v), out=flat["w"])
        else:
            m, v = state
            b1, c1, b2, c2, eps, rate = map(cast, _adam_scalars(config))
            numexpr.evaluate("b1 * m + c1 * dw", dict(flat, m=m, b1=b1, c1=c1), out=m)
            numexpr.evaluate("b2 * v + c2 * dw * dw", dict(flat, v=v, b2=b2, c2=c2), out=v)
            numexpr.evaluate("w - rate * m / (sqrt(v) + eps)", dict(flat, m=m, v=v, rate=rate, eps=eps),
                             out=flat["w"])
        return w, config

    return update


def numba_kernel(rule, parallel):
    """rule's in-place update as one loop over the elements, compiled by numba (prange over 2 threads if parallel)."""
    import numba

    loop = numba.prange if parallel else range
    jit = numba.njit(parallel=parallel)
    if rule == "sgd":
        @jit
        def kernel(w, dw, lr):
            for i in loop(w.size):
                w[i] -= lr * dw[i]
    elif rule == "sgd_momentum":
        @jit
        def kernel(w, dw, v, mu, lr):
            for i in loop(w.size):
                step = mu * v[i] - lr * dw[i]
                v[i] = step
                w[i] += step
    else:
        @jit
        def kernel(w, dw, m, v, b1, c1, b2, c2, eps, rate):
            for i in loop(w.size):
                g = dw[i]
                mi = b1 * m[i] + c1 * g
                vi = b2 * v[i] + c2 * g * g
                m[i], v[i] = mi, vi
                w[i] -= rate * mi / (math.sqrt(vi) + eps)

    def update(w, dw, config=None, w_scale=1.0):
        config = {} if config is None else config
        state = _prepared(rule, w, config)
        cast = w.dtype.type
        if rule == "sgd":
            scalars = (config["learning_rate"],)
        elif rule == "sgd_momentum":
            scalars = (config["momentum"], config["learning_rate"])
        else:
            scalars = _adam_scalars(config)
        kernel(w.reshape(-1), dw.reshape(-1), *state, *map(cast, scalars))
        return w, config

    return update


def make_update(kernel, rule):
    from dpnet import optim

    if kernel == "numpy":
        return getattr(optim, rule).in_place
    if kernel.startswith("numexpr"):
        import numexpr

        numexpr.set_num_threads(2 if kernel.endswith("x2") else 1)
        return numexpr_kernel(rule)
    import numba

    numba.set_num_threads(2 if kernel.endswith("x2") else 1)
    return numba_kernel(rule, parallel=kernel.endswith("x2"))


def largest_difference(update, rule, dtype):
    """The largest difference, relative to the array's largest element, between two steps of `update` and of dpnet's
    built-in rule, over w and the state arrays."""
    from dpnet import optim

    rng = np.random.default_rng(0)
    w = rng.standard_normal(100_003).astype(dtype)
    gradients = [w * 0.5, rng.standard_normal(w.size).astype(dtype)]
    results = []
    for fn in (getattr(optim, rule).in_place, update):
        w_, config = w.copy(), dict(HYPER[rule])
        for dw in gradients:
            fn(w_, dw, config)
        results.append([w_, *(config[key] for key in STATE[rule])])
    return max(float(np.max(np.abs(a - b)) / np.max(np.abs(a))) for a, b in zip(*results))


def worker(spec):
    """In a process of its own: time every (dtype, rule) of one kernel. Returns {case: {...}}."""
    from threadpoolctl import threadpool_limits

    from bench_sections.exchange_step import ExchangeStep
    from dpnet.classifiers.fc_net import FullyConnectedNet

    results = {}
    with threadpool_limits(limits=2, user_api="blas"):
        for dtype in spec["dtypes"]:
            for rule in spec["rules"]:
                update = make_update(spec["kernel"], rule)  # in place: what the step applies, its calls timed
                X, y = synthetic_batch(256, dtype)
                step = ExchangeStep(FullyConnectedNet([512, 512], dtype=dtype, seed=0), update, dict(HYPER[rule]))
                steps, updates = [], []
                for i in range(spec["warmup"] + spec["steps"]):
                    step.apply_seconds = 0.0
                    start = time.perf_counter()
                    step(X, y)  # as bench.py's step section: the same batch each step
                    if i >= spec["warmup"]:
                        steps.append(time.perf_counter() - start)
                        updates.append(step.apply_seconds)
                results[f"{dtype} {rule}"] = dict(steps=steps, updates=updates,
                                                  difference=largest_difference(update, rule, dtype))
    return dict(cases=results, pss_mb=memory_now()[1])


def hold(kernel):
    """In a process of its own: load what `kernel` needs and run it once on a small array, say "ready", and wait for
    standard input to close (what import_memory measures meanwhile)."""
    import dpnet.classifiers.fc_net  # noqa: F401 (what every worker holds besides the kernel)

    update = make_update(kernel, "sgd")
    update(np.zeros(8), np.ones(8), dict(HYPER["sgd"]))
    print("ready", flush=True)
    sys.stdin.read()


def import_memory(kernels, counts=(1, 4)):
    """{kernel: {n: summed PSS in MB of n processes holding the kernel's packages}} (see hold)."""
    results = {}
    for kernel in kernels:
        results[kernel] = {}
        for n in counts:
            command = [sys.executable, str(Path(__file__).resolve()), "--hold", kernel]
            processes = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          env=clean_environment()) for _ in range(n)]
            try:
                for process in processes:
                    if process.stdout.readline().strip() != "ready":
                        raise RuntimeError(f"a process holding {kernel} failed (exit {process.wait(60)})")
                results[kernel][n] = sum(memory_now(process.pid)[1] for process in processes)
            finally:
                for process in processes:
                    process.stdin.close()
                    process.wait(60)
    return results


def run_worker(spec):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    return json.loads(run(command, timeout=900).splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--rules", nargs="+", default=list(HYPER), choices=list(HYPER))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="steps measured per case and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--hold", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.hold:
        hold(args.hold)
        return

    import importlib.util

    kernels = [k for k in args.kernels if k not in PACKAGE or importlib.util.find_spec(PACKAGE[k])]
    missing = [k for k in args.kernels if k not in kernels]
    runs = {k: [] for k in kernels}
    for r in range(args.rounds):
        for kernel in kernels if r % 2 == 0 else kernels[::-1]:
            print(f"round {r + 1}/{args.rounds}: {kernel}", file=sys.stderr, flush=True)
            spec = dict(kernel=kernel, dtypes=args.dtypes, rules=args.rules, steps=args.steps, warmup=args.warmup)
            runs[kernel].append(run_worker(spec))

    print(f"FullyConnectedNet([512, 512]), batch 256, 2 BLAS threads; medians of {args.steps} steps x {args.rounds} "
          "rounds, each kernel in processes of its own")
    print(f"{'case':22} {'kernel':11} {'update ms':>9} {'rest ms':>8} {'step ms':>8} {'vs numpy':>8} "
          f"{'max rel diff':>12} {'PSS MB':>7}")
    for dtype in args.dtypes:
        for rule in args.rules:
            case, numpy_step = f"{dtype} {rule}", None
            for kernel in kernels:
                steps = np.concatenate([run["cases"][case]["steps"] for run in runs[kernel]])
                updates = np.concatenate([run["cases"][case]["updates"] for run in runs[kernel]])
                step, update, rest = median_ms(steps), median_ms(updates), median_ms(steps - updates)
                numpy_step = step if kernel == "numpy" else numpy_step
                ratio = f"{numpy_step / step:.2f}x" if numpy_step else ""
                difference = max(run["cases"][case]["difference"] for run in runs[kernel])
                pss = max((run["pss_mb"] or 0) for run in runs[kernel])
                print(f"{case:22} {kernel:11} {update:9.2f} {rest:8.2f} {step:8.2f} {ratio:>8} {difference:12.1e} "
                      f"{pss:7.0f}")
    memory = import_memory([k for k in kernels if not k.endswith("-x2")])
    print("PSS summed over 1 / 4 processes that imported dpnet and the kernel's package and ran the kernel once: "
          + ", ".join(f"{k} {m[1]:.0f} / {m[4]:.0f} MB" for k, m in memory.items()))
    for kernel in missing:
        print(f"{kernel}: not installed (pip install {PACKAGE[kernel]})")


if __name__ == "__main__":
    main()
