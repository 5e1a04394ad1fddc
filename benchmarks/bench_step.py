"""One training step of FullyConnectedNet against its BLAS floor.

The step is `model.loss(X, y)` plus an `sgd` update of every parameter. The floor is the time of exactly the matrix
products that the step performs, at the same shapes and dtype. The two are timed alternately in one process (so that
machine noise hits both alike) and the medians are compared.

    python benchmarks/bench_step.py [--hidden-dims 512 512] [--batch-size 256] [--repeats 60] [--json PATH]
"""

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_info

from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.optim import sgd


def blas_products(model, batch_size, dtype):
    """The (A, B) operand pairs of every matrix product in one training step, allocated once."""
    rng = np.random.default_rng(0)
    dims = [model.input_dim] + [model.params[f"W{i}"].shape[1] for i in range(1, model.num_layers + 1)]
    pairs = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        a, w, d = (rng.standard_normal(s).astype(dtype) for s in ((batch_size, fan_in), (fan_in, fan_out),
                                                                (batch_size, fan_out)))
        pairs.append((a, w))  # forward: activations @ W
        pairs.append((a.T, d))  # backward: dW = activations.T @ dout
        if fan_in != model.input_dim:
            pairs.append((d, w.T))  # backward: dx = dout @ W.T (not for the network's input)
    return pairs


def time_step(model, X, y, configs):
    start = time.perf_counter()
    _, grads = model.loss(X, y)
    for name, w in model.params.items():
        model.params[name], configs[name] = sgd(w, grads[name], configs[name])
    return time.perf_counter() - start


def time_floor(pairs):
    start = time.perf_counter()
    for a, b in pairs:
        a @ b
    return time.perf_counter() - start


def measure(hidden_dims, batch_size, dtype, repeats, warmup=5):
    model = FullyConnectedNet(hidden_dims, dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((batch_size, 3, 32, 32)).astype(dtype)
    y = rng.integers(10, size=batch_size)
    configs = {name: {"learning_rate": 1e-4} for name in model.params}
    pairs = blas_products(model, batch_size, dtype)
    steps, floors = [], []
    for i in range(warmup + repeats):
        step, floor = time_step(model, X, y, configs), time_floor(pairs)
        if i >= warmup:
            steps.append(step)
            floors.append(floor)
    step, floor = float(np.median(steps)), float(np.median(floors))
    return dict(dtype=np.dtype(dtype).name, step_ms=step * 1e3, floor_ms=floor * 1e3, ratio=step / floor,
                samples_per_sec=batch_size / step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    blas = [(info["internal_api"], info["num_threads"], info.get("architecture")) for info in threadpool_info()
            if info["user_api"] == "blas"]
    print(f"FullyConnectedNet({args.hidden_dims}), batch {args.batch_size}, BLAS {blas}, "
          f"medians of {args.repeats} interleaved repeats")
    print(f"{'dtype':8} {'step ms':>9} {'floor ms':>9} {'step/floor':>11} {'samples/s':>10}")
    results = []
    for dtype in (np.float32, np.float64):
        r = measure(args.hidden_dims, args.batch_size, dtype, args.repeats)
        results.append(r)
        print(f"{r['dtype']:8} {r['step_ms']:9.2f} {r['floor_ms']:9.2f} {r['ratio']:11.3f} "
              f"{r['samples_per_sec']:10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), blas=blas, results=results), f, indent=2)


if __name__ == "__main__":
    main()
