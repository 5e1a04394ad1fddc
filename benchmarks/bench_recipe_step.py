"""The default recipe's training step, timed inside the Solver, for side-by-side comparisons.

Each variant trains the command line's default model and recipe (`dpnet.config.DEFAULTS`: 3072-1024-512-10 with
batchnorm, crops and flips, sgd_momentum, label smoothing, weight decay, batch 256, float32) on the real CIFAR-10 for
`--steps` steps in a fresh job, and the Solver's own per-step time (`info["step_seconds"]`: drawing the batch,
forward, backward, gradient exchange, update) is recorded on rank 0. Variants alternate round by round (ABAB...), so
a noisy machine slows them alike; the table gives medians and each variant's time relative to the first.

A variant is `NAME=TREE:PROCESSES[:OPTION,...]`: TREE is a source folder holding a `dpnet` package (`.` for this
checkout; another one, such as a `git worktree` of an older commit, compares code against code), PROCESSES the
number of MPI processes (1: no mpiexec), and the options are Solver keywords switched off or on:
`replicated` (shard_optimizer=False), `mpi` (shared_memory=False), `plain-loss` (the model's loss hides every
keyword but `grads`, so that no Solver path can rely on a model-specific protocol), `sequential` (the default model
spelled as a dpnet.models.Sequential).

    python benchmarks/bench_recipe_step.py --data-dir DIR \
        --variant one=.:1 --variant two=.:2 --variant two-mpi=.:2:mpi --rounds 3

Uses public APIs only: dpnet.config.DEFAULTS, dpnet.train.build_model / make_lr_schedule / load_data, Augmentation,
Solver and a monitor.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")


def worker(args):
    """One job: train for args.steps steps and write rank 0's step times (seconds) to args.out."""
    from dpnet.augment import Augmentation
    from dpnet.config import DEFAULTS
    from dpnet.distributed import set_blas_threads
    from dpnet.solver import Solver
    from dpnet.train import build_model, load_data, make_lr_schedule

    set_blas_threads()  # $DPNET_BLAS_THREADS, set by run_variant: cores / processes
    options = set(filter(None, args.options.split(",")))
    config = {**DEFAULTS, "epochs": 1, "num_train": args.steps * DEFAULTS["batch_size"]}
    data = load_data(str(args.data_dir), config)
    model = build_model(config) if "sequential" not in options else sequential_default(config)
    if "plain-loss" in options:
        loss = model.loss
        model.loss = lambda X, y=None, grads=None: loss(X, y, grads=grads)
    times = []

    class StepTimes:
        def on_iteration_end(self, solver, info):
            times.append(info["step_seconds"])

    solver = Solver(model, data, update_rule=config["update_rule"],
                    optim_config={"learning_rate": config["lr"], "momentum": 0.9},
                    lr_schedule=make_lr_schedule(config), weight_decay=config["weight_decay"],
                    augment=Augmentation(crop_padding=config["crop_padding"]), batch_size=config["batch_size"],
                    num_epochs=1, num_train_samples=256, num_val_samples=256, verbose=False, seed=0,
                    monitors=[StepTimes()], shard_optimizer="replicated" not in options,
                    shared_memory="mpi" not in options)
    solver.train()
    if times:  # rank 0
        Path(args.out).write_text(json.dumps(times))


def sequential_default(config):
    """The command line's default FullyConnectedNet spelled as a dpnet.models.Sequential (the same parameters)."""
    from dpnet.models import Sequential

    layers = []
    for units in config["hidden_dims"]:
        layers += [{"layer": "affine", "units": units, "weight_scale": config["weight_scale"]},
                   config["normalization"], config["activation"]]
    layers.append({"layer": "affine", "units": 10, "weight_scale": config["weight_scale"]})
    return Sequential(layers, input_dim=(3, 32, 32), loss=config["loss"], reg=config["reg"],
                      dtype=np.dtype(config["dtype"]), seed=config["seed"], label_smoothing=config["label_smoothing"])


def run_variant(tree, processes, options, args, folder):
    out = Path(folder) / f"times-{time.perf_counter_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(Path(tree).resolve())
    env.setdefault("DPNET_BLAS_THREADS", str(max(1, args.cores // processes)))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data-dir", str(args.data_dir),
               "--steps", str(args.steps), "--options", options, "--out", str(out)]
    if processes > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = [str(mpiexec) if mpiexec.is_file() else shutil.which("mpiexec"), "-n", str(processes), *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return json.loads(out.read_text())


def parse_variant(text):
    name, _, spec = text.partition("=")
    tree, processes, *rest = spec.split(":")
    if not name or not tree or not processes.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=TREE:PROCESSES[:OPTION,...], got {text!r}")
    return name, tree, int(processes), rest[0] if rest else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("DPNET_DATA_DIR"),
                        help="the cifar-10-batches-py folder (default: $DPNET_DATA_DIR)")
    parser.add_argument("--variant", type=parse_variant, action="append", dest="variants",
                        help="NAME=TREE:PROCESSES[:OPTION,...] (repeatable; the first is the reference)")
    parser.add_argument("--steps", type=int, default=45, help="steps per job")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each job left out")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per variant, alternating")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="BLAS threads in all")
    parser.add_argument("--json", type=Path, help="write every step time here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("give --data-dir (or set DPNET_DATA_DIR): the recipe trains on the real CIFAR-10")
    if args.worker:
        return worker(args)
    variants = args.variants or [("default", str(HERE.parent), 1, "")]
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    times = {name: [] for name, *_ in variants}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for name, tree, processes, options in variants:
                print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                times[name] += run_variant(tree, processes, options, args, folder)[args.warmup:]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"default recipe step, medians of {args.rounds} x {args.steps - args.warmup} steps; {cpu}, "
          f"{args.cores} cores")
    reference = np.median(times[variants[0][0]])
    print(f"{'variant':<24}{'ms/step':>10}{'images/s':>10}{'vs ' + variants[0][0]:>16}")
    for name, tree, processes, options in variants:
        ms = 1e3 * np.median(times[name])
        print(f"{name:<24}{ms:>10.2f}{256e3 / ms:>10.0f}{ms / (1e3 * reference):>16.3f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "variants": variants, "times": times}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
