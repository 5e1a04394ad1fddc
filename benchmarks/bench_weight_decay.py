"""Decoupled weight decay inside the update rule's pass against a pass of its own over the weights.

    python benchmarks/bench_weight_decay.py [--hidden-dims 1024 512] [--rule sgd_momentum] [--steps 200]
                                            [--rounds 10] [--threads 2]

Two Solvers train the same model (the command line's default: batchnorm, weight decay 5e-3, batch 256, float32) on
the same synthetic data: one with the built-in rule, whose in-place variant takes the decay's scaling as `w_scale`
and applies it block by block while the block is in the cache; the other with the same rule behind an in-place
variant that does not take `w_scale`, so the Solver scales the weights in a pass of their own first (as it does for
such plugin rules). The parameters are the same bit for bit (tests/test_solver.py). They take turns in ABBA order,
one epoch each per round (`train()` again with one more epoch), and the Solver times every step itself (a monitor
reads `info["step_seconds"]`: drawing the minibatch, forward, backward, update); the first step of each round (the
parameters are bound to the gradient exchange anew) and the first --warmup steps are left out. This prints the
median step of each and their ratio.
"""

import argparse

import numpy as np

from dpnet import registry
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.config import DEFAULTS
from dpnet.solver import Solver


class StepTimes:
    """A monitor keeping the Solver's own time of every step."""

    def __init__(self):
        self.seconds = []

    def on_iteration_end(self, solver, info):
        self.seconds.append(info["step_seconds"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=DEFAULTS["hidden_dims"])
    parser.add_argument("--rule", default=DEFAULTS["update_rule"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each Solver")
    parser.add_argument("--warmup", type=int, default=20, help="steps of each Solver left out at the start")
    parser.add_argument("--rounds", type=int, default=10, help="turns of each Solver (ABBA)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    builtin = registry.get_update_rule(args.rule)

    def separate(w, dw, config=None):
        return builtin(w, dw, config)

    separate.in_place = lambda w, dw, config=None: builtin.in_place(w, dw, config)
    separate.elementwise = True
    per_round = -(-(args.warmup + args.steps) // args.rounds) + 1  # an epoch: its first step is left out
    rng = np.random.default_rng(0)
    batch = DEFAULTS["batch_size"]
    n = per_round * batch
    data = dict(X_train=rng.standard_normal((n, 3072)).astype(np.float32), y_train=rng.integers(10, size=n),
                X_val=np.zeros((1, 3072), np.float32), y_val=np.zeros(1, int))
    monitors, solvers = {}, {}
    for name, rule in (("inside the rule's pass", args.rule), ("a pass of its own", separate)):
        monitors[name] = StepTimes()
        solvers[name] = Solver(FullyConnectedNet(args.hidden_dims, normalization=DEFAULTS["normalization"], seed=0),
                               data, update_rule=rule, optim_config={"learning_rate": 1e-3}, batch_size=batch,
                               num_epochs=0, num_train_samples=10, verbose=False, seed=0,
                               weight_decay=DEFAULTS["weight_decay"], monitors=[monitors[name]])
    times = {name: [] for name in solvers}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for r in range(args.rounds):
            for name in list(solvers) if r % 2 == 0 else list(solvers)[::-1]:
                solvers[name].num_epochs += 1
                solvers[name].train()
                times[name] += monitors[name].seconds[1:]
                monitors[name].seconds.clear()
    medians = {name: 1e3 * float(np.median(values[args.warmup:args.warmup + args.steps]))
               for name, values in times.items()}
    print(f"{args.rule}, FullyConnectedNet({args.hidden_dims}), batch {batch}, weight decay "
          f"{DEFAULTS['weight_decay']}, {args.threads} BLAS threads, medians of {args.steps} steps:")
    for name, value in medians.items():
        print(f"  weight decay {name}: {value:.2f} ms")
    first, second = medians.values()
    print(f"  ratio: {first / second:.3f}")


if __name__ == "__main__":
    main()
