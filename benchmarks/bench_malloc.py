"""What fixing glibc's mmap threshold (dpnet.heap.return_freed_memory) costs the training step: nothing measurable.

    python benchmarks/bench_malloc.py --data-dir ../shared/data/cifar-10-batches-py [--steps 200] [--threads 2]

One process builds the command line's default model and Solver (dpnet.config.DEFAULTS: batchnorm, sgd_momentum,
augmentation, float32, batch 256) on CIFAR-10 and times whole `Solver._step`s (minibatch drawn from the uint8 images,
augmented, converted; forward, backward, update), switching glibc's threshold between steps (ABBA order):

- fixed: 128 KiB, what return_freed_memory sets: every array of 128 KiB or more is its own mapping, unmapped when
  freed (its pages are faulted in anew at each allocation);
- heap: 32 MiB, glibc's ceiling, which its dynamic threshold reaches once a large array has been freed: arrays come
  from the heap and freed chunks are kept for reuse.

It prints the median step of each and their ratio. Linux with glibc only.
"""

import argparse
import time

import numpy as np

from dpnet.config import DEFAULTS
from dpnet.data_utils import locate_CIFAR10
from dpnet.heap import libc_mallopt_threshold
from dpnet.solver import Solver
from dpnet.train import build_model, load_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 (None: $DPNET_DATA_DIR, else dpnet's data folder)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each setting")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    config = dict(DEFAULTS)
    data = load_data(locate_CIFAR10(args.data_dir, download=False), config)
    from dpnet.augment import Augmentation

    solver = Solver(build_model(config), data, update_rule=config["update_rule"],
                    optim_config={"learning_rate": config["lr"]}, batch_size=config["batch_size"], verbose=False,
                    seed=0, weight_decay=config["weight_decay"], augment=Augmentation(config["crop_padding"]))
    settings = {"fixed": 128 * 1024, "heap": 32 * 1024 * 1024}
    times = {name: [] for name in settings}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for i in range(args.warmup + args.steps):
            for name in settings if i % 2 == 0 else reversed(settings):
                if not libc_mallopt_threshold(settings[name]):
                    parser.error("glibc's mallopt is not available here")
                start = time.perf_counter()
                solver._step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    fixed, heap = (1e3 * float(np.median(times[name])) for name in settings)
    print(f"Solver step, {config['hidden_dims']} {config['normalization']} {config['update_rule']} "
          f"{config['dtype']} batch {config['batch_size']}, {args.threads} BLAS threads, medians of {args.steps}:")
    print(f"  threshold fixed at 128 KiB: {fixed:.2f} ms\n  threshold 32 MiB (heap):    {heap:.2f} ms\n"
          f"  fixed / heap: {fixed / heap:.3f}")


if __name__ == "__main__":
    main()
