"""Where a training step's time goes, dpnet against PyTorch: forward and backward, then the update.

    python benchmarks/bench_phases.py [--dtype float64] [--rule sgd_momentum] [--threads 2] [--steps 200] [--rounds 2]

Each framework trains the same MLP (FullyConnectedNet([512, 512]) shapes, batch 256, synthetic batch) in its own
process (their thread pools must not share one), alternating dpnet and PyTorch round by round. Inside a process every
step is timed in two phases: dpnet's step as the Solver takes it through the public gradient-exchange protocol
(bench_sections.exchange_step): bind and the model's loss into the exchange's gradient views (forward and backward),
then the exchange's reduce and update (the rule's in-place variant); PyTorch's zero_grad + forward + loss + backward,
and `optimizer.step()`. Medians after 20 warm-up steps. PyTorch is optional (`pip install torch==2.13.0`).
"""

import argparse
import importlib.util
import json
import sys
import time

import numpy as np

from bench_sections.common import LEARNING_RATES, synthetic_batch
from bench_sections.workers import run

HIDDEN, BATCH = [512, 512], 256


def measure(framework, dtype, rule, threads, steps):
    """{"forward_backward_ms": ..., "update_ms": ...}: medians of the two phases over `steps` steps."""
    X, y = synthetic_batch(BATCH, dtype)
    lr = LEARNING_RATES[rule]
    phases = ([], [])
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        dims, layers = [X[0].size, *HIDDEN, 10], []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1]).to(torch_dtype)
        X, y = torch.from_numpy(X.reshape(BATCH, -1)), torch.from_numpy(y)
        optimizer = (torch.optim.Adam(net.parameters(), lr=lr) if rule == "adam"
                     else torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9 if rule == "sgd_momentum" else 0))
        loss_fn = torch.nn.CrossEntropyLoss()

        def gradients():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(X), y).backward()

        update = optimizer.step
    else:
        from threadpoolctl import threadpool_limits

        from bench_sections.exchange_step import ExchangeStep
        from dpnet.classifiers.fc_net import FullyConnectedNet

        threadpool_limits(threads, user_api="blas")
        step = ExchangeStep(FullyConnectedNet(HIDDEN, dtype=dtype, seed=0), rule, {"learning_rate": lr})
        last = {}

        def gradients():
            last["loss"], last["grads"] = step.gradients(X, y)

        def update():
            step.update(last["loss"], last["grads"])

    for _ in range(steps + 20):
        start = time.perf_counter()
        gradients()
        middle = time.perf_counter()
        update()
        end = time.perf_counter()
        phases[0].append(middle - start)
        phases[1].append(end - middle)
    return {"forward_backward_ms": 1e3 * float(np.median(phases[0][20:])),
            "update_ms": 1e3 * float(np.median(phases[1][20:]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--rule", default="sgd_momentum", choices=["sgd", "sgd_momentum", "adam"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.dtype, args.rule, args.threads, args.steps)))
        return
    frameworks = ["dpnet", "torch"]
    if importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed (pip install torch==2.13.0): dpnet only")
        frameworks = ["dpnet"]
    results = {f: [] for f in frameworks}
    for r in range(args.rounds):
        for framework in frameworks if r % 2 == 0 else frameworks[::-1]:
            out = run([sys.executable, __file__, "--worker", framework, "--dtype", args.dtype, "--rule", args.rule,
                       "--threads", str(args.threads), "--steps", str(args.steps)], threads=args.threads, timeout=600)
            results[framework].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.dtype} {args.rule}, {args.threads} threads, batch {BATCH}, MLP 3072-{'-'.join(map(str, HIDDEN))}-10; "
          f"medians of {args.steps} steps, {args.rounds} rounds")
    for framework, runs in results.items():
        fb = np.median([run["forward_backward_ms"] for run in runs])
        up = np.median([run["update_ms"] for run in runs])
        print(f"{framework:6}  forward+backward {fb:6.2f} ms  update {up:5.2f} ms  step {fb + up:6.2f} ms")


if __name__ == "__main__":
    main()
