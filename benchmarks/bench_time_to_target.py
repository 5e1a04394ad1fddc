"""Time to the seed's 50% validation accuracy, and time until the data is loaded and ready.

Trains FullyConnectedNet([hidden]) (float32) with the Solver; every --check-every iterations a monitor scores the
1000 validation images (not counted) and stops training once the target is reached. Training time is the sum of the
Solver's step times: drawing and converting the minibatch, forward, backward and update.

    python benchmarks/bench_time_to_target.py --data-dir DIR [--repeats 5] [--target 0.5]

The data time is that of a warm cache; point DPNET_CACHE_DIR at an empty folder to measure a first (cold) load.
"""

import argparse
import time

import numpy as np

from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.data_utils import get_CIFAR10_data
from dpnet.solver import Solver


class StopAtTarget:
    """Counts training seconds and stops the Solver when validation accuracy reaches the target."""

    def __init__(self, X_val, y_val, target, check_every):
        self.X_val, self.y_val, self.target, self.check_every = X_val, y_val, target, check_every
        self.seconds, self.reached = 0.0, None

    def on_iteration_end(self, solver, info):
        self.seconds += info["step_seconds"]
        if info["iteration"] % self.check_every == 0:
            accuracy = solver.check_accuracy(self.X_val, self.y_val, batch_size=1000)
            if accuracy >= self.target:
                self.reached = (info["iteration"], accuracy)
                solver.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--update-rule", default="sgd_momentum")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-scale", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = get_CIFAR10_data(data_dir=args.data_dir, lazy=True, dtype=np.float32)
    loaded = time.perf_counter() - start
    print(f"data loaded and ready in {loaded:.2f} s (lazy uint8 images, memory-mapped cache)")

    results = []
    for seed in range(args.repeats):
        model = FullyConnectedNet([args.hidden], weight_scale=args.weight_scale, seed=seed)
        monitor = StopAtTarget(data["X_val"], data["y_val"], args.target, args.check_every)
        solver = Solver(model, data, update_rule=args.update_rule, optim_config={"learning_rate": args.lr},
                        batch_size=args.batch_size, num_epochs=20, num_train_samples=10, num_val_samples=10,
                        verbose=False, seed=seed, monitors=[monitor])
        solver.train()
        if monitor.reached is None:
            print(f"seed {seed}: target not reached in 20 epochs")
            continue
        iteration, accuracy = monitor.reached
        results.append(monitor.seconds)
        print(f"seed {seed}: {accuracy:.3f} validation accuracy after {iteration} iterations, "
              f"{monitor.seconds:.2f} s of training")
    if results:
        print(f"median time to {args.target:.0%} validation accuracy: {np.median(results):.2f} s of training "
              f"({len(results)} of {args.repeats} runs reached it)")


if __name__ == "__main__":
    main()
