"""The default recipe, images per second: dpnet against PyTorch doing the same recipe, 1 and 2 processes.

    python benchmarks/bench_recipe.py --data-dir DIR [--processes 1 2] [--steps 60] [--warmup 10] [--rounds 3]

The recipe is the command line's default (`dpnet.config.DEFAULTS`): ZCA-whitened images (whitened once, before
training), 3072-1024-512-10 with batchnorm and ReLU, random crops (padding 4) and horizontal flips, softmax loss with
label smoothing 0.1, sgd_momentum 0.9 with decoupled weight decay on the weights, the cosine schedule with warm-up, a
moving average of the parameters folded every 4 steps, global batch 256, float32, on the real CIFAR-10 training images
(without --zca: uint8 in memory, mean image subtracted per batch). Scoring with flips happens only at evaluations,
which are not timed. Each case is a fresh job that trains
`--steps` steps; the first `--warmup` are left out, and a step's time is the wall time from one step's end to the
next (the whole loop: everything a run does per step but the epoch-end evaluation). Cases alternate round by round in
ABBA order so that a noisy machine slows them alike; the table gives medians, images/s (global batch / median step)
and the step's breakdown on rank 0:

- dpnet: a Solver with the command line's monitors (progress, TensorBoard); the phases are the Solver's own
  `info["phase_seconds"]`: batch (draw, gather, crop, flip, convert), forward+backward, exchange (the gradient sum
  over processes), update; bookkeeping is the rest of the step (monitors, schedule, the loop).
- PyTorch (optional, `pip install torch==2.13.0`): the same model (`nn.Sequential` of Linear, BatchNorm1d, ReLU),
  initialization, loss (`CrossEntropyLoss(label_smoothing=0.1)`), `torch.optim.SGD(momentum=0.9)` with the decay as
  `torch._foreach_mul_` on the weights, the average as `torch._foreach_lerp_`, the same schedule, the same whitened
  images, and the same augmentation as batched tensor operations
  (gather, convert, subtract the mean, `F.pad`, one advanced-indexing gather of the crops, `torch.where` of the
  flips). Two processes: `DistributedDataParallel` over gloo (its gradient sum runs inside backward, so the exchange
  column is empty), each process normalizing with its own half of the batch (`BatchNorm1d`; dpnet synchronizes the
  batch statistics).

Each process gets cores / processes threads (BLAS for dpnet, `torch.set_num_threads` for PyTorch).
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_sections.common import TORCH_HINT, progress
from bench_sections.workers import mpiexec, run

PHASES = ("batch", "gradients", "exchange", "update", "bookkeeping")


# ----------------------------------------------------------------------------------------------- dpnet
def dpnet_worker(args):
    """Train the default recipe for args.steps steps; rank 0 writes per-step wall times and phases to args.out."""
    from dpnet.augment import Augmentation
    from dpnet.config import DEFAULTS
    from dpnet.distributed import get_communicator, set_blas_threads
    from dpnet.monitor import ProgressMonitor, TensorBoardMonitor
    from dpnet.solver import Solver
    from dpnet.train import build_model, load_data, make_lr_schedule

    set_blas_threads()
    config = {**DEFAULTS, "epochs": 1, "num_train": args.steps * DEFAULTS["batch_size"]}
    data = load_data(str(args.data_dir), config)
    records = []

    class Timer:
        def on_iteration_end(self, solver, info):
            records.append((time.perf_counter(), dict(info["phase_seconds"])))

    with tempfile.TemporaryDirectory() as logdir:
        monitors = [ProgressMonitor(quiet=True), TensorBoardMonitor(logdir), Timer()]
        solver = Solver(build_model(config), data, update_rule=config["update_rule"],
                        optim_config={"learning_rate": config["lr"], **config["optim"]},
                        lr_schedule=make_lr_schedule(config), weight_decay=config["weight_decay"],
                        augment=Augmentation(crop_padding=config["crop_padding"]), batch_size=config["batch_size"],
                        num_epochs=1, num_train_samples=256, num_val_samples=256, verbose=False,
                        seed=config["seed"], comm=get_communicator(), monitors=monitors,
                        shard_optimizer=config["shard_optimizer"], shared_memory=config["shared_memory"])
        solver.train()
    if records:
        write_steps(args.out, records)


def write_steps(path, records):
    """records: (time at the step's end, {phase: seconds}) per step; each step's wall time is the gap to the
    previous end (the first step has none) and bookkeeping what the phases leave of it."""
    steps = []
    for (before, _), (end, phases) in zip(records, records[1:]):
        wall = end - before
        steps.append({"wall": wall, **phases, "bookkeeping": wall - sum(phases.values())})
    Path(path).write_text(json.dumps(steps))


# ----------------------------------------------------------------------------------------------- PyTorch
def torch_worker(args):
    """The same recipe in PyTorch (alone, or as one rank of a gloo job: RANK and WORLD_SIZE in the environment)."""
    import torch
    import torch.nn.functional as F

    from dpnet.config import DEFAULTS
    from dpnet.train import load_data, make_lr_schedule

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(max(1, args.cores // world))
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    config = {**DEFAULTS, "epochs": 1, "num_train": args.steps * DEFAULTS["batch_size"]}
    data = load_data(str(args.data_dir), config)  # whitened as dpnet's are with the default --zca
    whitened = getattr(data["X_train"], "zca", None) is not None
    if whitened:  # the whitened images as floats (whitening is done once, before training, in both)
        images, mean = torch.from_numpy(np.asarray(data["X_train"])), None
    else:  # uint8, converted per batch
        images = torch.from_numpy(np.ascontiguousarray(data["X_train"].raw))
        mean = torch.from_numpy(data["X_train"].mean_image.astype(np.float32))
    labels = torch.from_numpy(np.asarray(data["y_train"], dtype=np.int64))
    batch, pad = config["batch_size"], config["crop_padding"]
    mine = slice(rank * batch // world, (rank + 1) * batch // world)

    torch.manual_seed(config["seed"])
    dims = [3 * 32 * 32, *config["hidden_dims"], 10]
    layers = [torch.nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        linear = torch.nn.Linear(fan_in, fan_out)
        torch.nn.init.normal_(linear.weight, std=config["weight_scale"])
        torch.nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(dims) - 2:
            layers += [torch.nn.BatchNorm1d(fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    weights = [p for p in net.parameters() if p.dim() >= 2]
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    schedule = make_lr_schedule(config)
    generator = torch.Generator().manual_seed(config["seed"])  # the same global batch on every rank
    order = torch.randperm(len(labels), generator=generator)
    rows, columns = torch.arange(32), torch.arange(32)
    averaged = [p.detach().clone() for p in net.parameters()] if config["ema"] else None  # --ema's average
    records = []
    for step in range(args.steps):
        start = time.perf_counter()
        index = order[step * batch:(step + 1) * batch]
        flips = torch.rand(batch, generator=generator) < 0.5
        dy, dx = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)
        index, flips, dy, dx = index[mine], flips[mine], dy[mine], dx[mine]
        x = F.pad(images[index] if whitened else images[index].float() - mean, (pad, pad, pad, pad))
        n = len(index)
        x = x[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
              (dy[:, None] + rows)[:, None, :, None], (dx[:, None] + columns)[:, None, None, :]]
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
        y = labels[index]
        drawn = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        computed = time.perf_counter()
        lr = config["lr"] * schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            torch._foreach_mul_(weights, 1 - lr * config["weight_decay"])
        optimizer.step()
        if averaged is not None and (step + 1) % config["ema_every"] == 0:
            with torch.no_grad():
                torch._foreach_lerp_(averaged, list(net.parameters()), 1 - config["ema"] ** config["ema_every"])
        updated = time.perf_counter()
        loss_value = loss.item()  # what a training loop logs
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"PyTorch's loss became {loss_value}")
        records.append((time.perf_counter(), dict(batch=drawn - start, gradients=computed - drawn, exchange=0.0,
                                                  update=updated - computed)))
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        write_steps(args.out, records)


# ----------------------------------------------------------------------------------------------- the jobs
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(framework, processes, args, folder):
    """One job of `framework` on `processes` processes: the list of rank 0's step records."""
    out = Path(folder) / f"{framework}-{processes}-{time.perf_counter_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--data-dir",
               str(args.data_dir), "--steps", str(args.steps), "--cores", str(args.cores), "--out", str(out)]
    threads = max(1, args.cores // processes)
    if framework == "dpnet":
        if processes > 1:
            command = [mpiexec(), "-n", str(processes), *command]
        run(command, threads, timeout=args.timeout)
    else:
        if processes > 1:  # one process per rank, as torchrun would start them; any rank failing fails the job
            ranks = " ".join(map(str, range(processes)))
            script = (f"pids=''; for r in {ranks}; do env RANK=$r WORLD_SIZE={processes} MASTER_ADDR=127.0.0.1 "
                      f"MASTER_PORT={free_port()} {' '.join(map(_quote, command))} & pids=\"$pids $!\"; done; "
                      "status=0; for p in $pids; do wait $p || status=1; done; exit $status")
            command = ["sh", "-c", script]
        run(command, threads, timeout=args.timeout)
    return json.loads(out.read_text())[args.warmup:]


def _torch_installed():
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:
        return False


def _quote(text):
    return "'" + str(text).replace("'", "'\\''") + "'"


def summarize(steps, batch):
    """Medians (ms) of the wall time and of each phase, and images per second of the median step."""
    row = {phase: 1e3 * float(np.median([s[phase] for s in steps])) for phase in ("wall", *PHASES)}
    row["images_per_sec"] = batch / (row["wall"] / 1e3)
    return row


def print_table(results, cpu, args):
    print(f"\nthe default recipe, medians of {args.rounds} x {args.steps - args.warmup} steps per case; {cpu}; "
          f"{args.cores} cores")
    header = f"{'case':<16}{'images/s':>10}{'step ms':>9}" + "".join(f"{p:>13}" for p in PHASES)
    print(header)
    for name, row in results.items():
        if "hint" in row:
            print(f"{name:<16}{row['hint']}")
            continue
        print(f"{name:<16}{row['images_per_sec']:>10.0f}{row['wall']:>9.2f}"
              + "".join(f"{row[p]:>13.2f}" for p in PHASES))
    for processes in args.processes:
        ours, theirs = results.get(f"dpnet x{processes}"), results.get(f"pytorch x{processes}")
        if ours and theirs and "hint" not in theirs:
            print(f"dpnet / PyTorch, {processes} process(es): "
                  f"{ours['images_per_sec'] / theirs['images_per_sec']:.2f}x images/s")
    if len(args.processes) > 1:
        first, *others = args.processes
        for processes in others:
            print(f"dpnet {processes} processes / 1: "
                  f"{results[f'dpnet x{processes}']['images_per_sec'] / results[f'dpnet x{first}']['images_per_sec']:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("DPNET_DATA_DIR"),
                        help="the cifar-10-batches-py folder (default: $DPNET_DATA_DIR)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--frameworks", nargs="+", default=["dpnet", "pytorch"], choices=["dpnet", "pytorch"])
    parser.add_argument("--steps", type=int, default=60, help="steps per job")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each job left out")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per case, alternating")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="threads in all")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds a job may take")
    parser.add_argument("--json", type=Path, help="write every step's record and the summary here")
    parser.add_argument("--worker", choices=["dpnet", "pytorch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("give --data-dir (or set DPNET_DATA_DIR): the recipe trains on the real CIFAR-10")
    if args.worker:
        return (dpnet_worker if args.worker == "dpnet" else torch_worker)(args)
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")

    cases = [(framework, processes) for processes in args.processes for framework in args.frameworks]
    steps = {case: [] for case in cases}
    hints = {}
    if "pytorch" in args.frameworks and not _torch_installed():
        hints = {case: TORCH_HINT for case in cases if case[0] == "pytorch"}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for case in cases if round_ % 2 == 0 else cases[::-1]:
                if case not in hints:
                    progress(f"round {round_ + 1}/{args.rounds}: {case[0]} x{case[1]}")
                    steps[case] += run_case(*case, args, folder)
    results = {f"{f} x{p}": ({"hint": hints[(f, p)]} if (f, p) in hints else summarize(steps[(f, p)], 256))
               for f, p in cases}
    from bench_sections.report import environment

    env = environment()
    print_table(results, env.get("cpu", "unknown CPU"), args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "config": vars(args) | {"data_dir": str(args.data_dir),
                                                                                     "json": str(args.json)},
                                         "summary": results,
                                         "steps": {f"{f} x{p}": steps[(f, p)] for f, p in cases}}, default=str))


if __name__ == "__main__":
    sys.exit(main())
