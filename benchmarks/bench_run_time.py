"""Wall time of whole `python -m dpnet.train` runs, configuration against configuration, alternating.

    python benchmarks/bench_run_time.py --data-dir DIR --epochs 3 --rounds 2 \
        --case before=OLD_TREE: --case default=.: --case long=.:--config,configs/long.toml

A case is `NAME=TREE:ARGS`: TREE a folder holding a `dpnet` package (`.` is this checkout; a `git worktree` of
another commit compares code against code), ARGS the command line's flags, comma-separated. Each run trains
`--epochs` epochs in a fresh process (data loading included: what a user waits for) and the table gives, per case,
the median over the rounds of: the time to the first epoch line (start-up: imports, data, a ZCA matrix; the first
epoch), the median epoch after the first (from the epoch lines), and a full run's projected time,
start-up + (E - 1) x epoch, for the case's own number of epochs E (`--full-epochs NAME=E`, default 100).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sections.common import progress
from bench_sections.workers import clean_environment

EPOCH = re.compile(r"^epoch (\d+)/\d+: .*, ([0-9.e+]+) s \(", re.M)


def run_case(tree, flags, args, folder):
    """(seconds to the end of the first epoch, [seconds of each later epoch]) of one run."""
    env = clean_environment()
    env["PYTHONPATH"] = str(Path(tree).resolve())
    command = [sys.executable, "-m", "dpnet.train", "--data-dir", str(args.data_dir), *flags, "--epochs",
               str(args.epochs), "--logdir", str(Path(folder) / f"run-{time.perf_counter_ns()}")]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    first, epochs = None, []
    for line in process.stdout:
        match = EPOCH.match(line)
        if match and first is None:
            first = time.perf_counter() - start
        elif match:
            epochs.append(float(match.group(2)))
    if process.wait() != 0 or first is None:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()}")
    return first, epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("DPNET_DATA_DIR"), help="CIFAR-10 folder")
    parser.add_argument("--case", action="append", dest="cases", required=True, help="NAME=TREE:FLAG,FLAG,...")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (at least 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per case, alternating")
    parser.add_argument("--full-epochs", action="append", default=[], help="NAME=E: a full run's epochs (100)")
    args = parser.parse_args(argv)
    if args.data_dir is None or args.epochs < 2:
        parser.error("give --data-dir (or $DPNET_DATA_DIR) and --epochs >= 2")
    cases = []
    for text in args.cases:
        name, _, spec = text.partition("=")
        tree, _, flags = spec.partition(":")
        cases.append((name, tree, [f for f in flags.split(",") if f]))
    full = {name: int(e) for name, _, e in (text.partition("=") for text in args.full_epochs)}
    firsts, epochs = {name: [] for name, *_ in cases}, {name: [] for name, *_ in cases}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for name, tree, flags in cases if round_ % 2 == 0 else cases[::-1]:
                progress(f"round {round_ + 1}/{args.rounds}: {name}")
                first, later = run_case(tree, flags, args, folder)
                firsts[name].append(first)
                epochs[name] += later
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"whole runs of {args.epochs} epochs, {args.rounds} rounds; {cpu}, {os.cpu_count()} cores")
    print(f"{'case':<12}{'first epoch s':>15}{'epoch s':>10}{'full run':>12}")
    for name, *_ in cases:
        first, epoch = statistics.median(firsts[name]), statistics.median(epochs[name])
        total = first + (full.get(name, 100) - 1) * epoch
        print(f"{name:<12}{first:>15.1f}{epoch:>10.2f}{total / 60:>9.1f} min")


if __name__ == "__main__":
    sys.exit(main())
