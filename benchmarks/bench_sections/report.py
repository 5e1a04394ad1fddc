"""The table bench.py prints, and the environment it records with the results."""

import importlib.util
import os
import platform
import subprocess
import sys

import numpy as np

from .workers import REPO


def environment():
    from threadpoolctl import threadpool_info

    env = dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
               cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               blas=[{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                     for info in threadpool_info() if info["user_api"] == "blas"],
               OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE"))
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    git = ["git", "--no-optional-locks", "-C", str(REPO)]  # reads only: never touches the index
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        if commit.returncode == 0:
            env.update(git_commit=commit.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    for module in ("mpi4py", "torch"):
        if importlib.util.find_spec(module) is not None:
            env[module] = "installed"  # versions are read in the workers (importing torch here costs seconds)
    return env


def _step_rows(results):
    for r in results:
        target = "<= 1.10" if r["rule"] == "sgd" else ""
        yield ("step vs BLAS floor", f"{r['dtype']} {r['rule']}",
               f"{r['step_ms']:.2f} ms ({r['samples_per_sec']:,.0f}/s)", f"floor {r['floor_ms']:.2f} ms",
               f"{r['ratio']:.3f}", target)
        if "handwritten_ms" in r:
            yield ("step vs BLAS floor", f"{r['dtype']} {r['rule']}, hand-written NumPy",
                   f"{r['handwritten_ms']:.2f} ms", f"floor {r['floor_ms']:.2f} ms", f"{r['handwritten_ratio']:.3f}",
                   "(reference)")


def _torch_rows(torch):
    for r in torch["rows"]:
        case = f"{r['dtype']} {r['rule']}"
        if "note" in r:
            yield ("dpnet vs PyTorch", case, "-", r["note"], "", "> 1 (aim 1.3)")
            continue
        yield ("dpnet vs PyTorch", case, f"{r['dpnet_ms']:.2f} ms ({r['dpnet_samples_per_sec']:,.0f}/s)",
               f"torch {r['torch_ms']:.2f} ms ({r['torch_samples_per_sec']:,.0f}/s)", f"{r['speedup']:.2f}x",
               "> 1 (aim 1.3)")


DISTRIBUTED_LABELS = {"replicated": ("state replicated, gradients summed in shared memory", "sums and barriers share"),
                      "replicated_mpi": ("state replicated, MPI only", "Allreduce share"),
                      "sharded": ("state sharded, shared memory", "sums, copies and barriers share"),
                      "sharded_mpi": ("state sharded, MPI only", "reduce-scatter + allgather share")}


def _distributed_rows(dist):
    if not dist["available"]:
        yield ("1 vs P processes", "-", "-", dist["note"], "", "")
        return
    P, T = dist["processes"], dist["threads"]
    label = f"{dist['rule']}, {P} x {max(1, T // P)} thread{'s' if T // P > 1 else ''} vs 1 x {T}"
    for name, case in dist["cases"].items():
        how, communication = DISTRIBUTED_LABELS[name]
        if not case["shared_memory"] and not name.endswith("_mpi"):
            how += " (none available: MPI)"
        yield ("1 vs P processes", f"step, {label}, {how}", f"{case['step_ms']:.2f} ms",
               f"{dist['serial_step_ms']:.2f} ms", f"{case['speedup']:.2f}x", "")
        yield ("1 vs P processes", f"  {communication}, {P} processes", f"{case['comm_ms']:.2f} ms of the step",
               f"exchange.reduce {100 * case['reduce_share']:.1f}%", f"{100 * case['comm_share']:.1f}%", "<= 10%")
    yield ("1 vs P processes", f"fused vs pickled ({dist['gradient_megabytes']:.1f} MB)",
           f"{dist['fused_ms']:.2f} ms (call alone {dist['reduce_only_ms']:.2f})",
           f"pickled {dist['pickled_ms']:.2f} ms", f"{dist['fused_speedup']:.1f}x", "")


def _memory_rows(mem):
    if not mem["available"]:
        yield ("memory (CIFAR-10)", "-", "-", mem["note"], "", "")
        return
    for job in mem["jobs"].values():
        p = job["processes"]
        private = np.mean([r["uss_mb"] or 0.0 for r in job["ranks"]])
        how = ("" if p == 1 else ", state replicated" if not job.get("shard_optimizer")
               else ", state sharded, shared memory" if job.get("shared_memory") else ", state sharded, MPI only")
        yield ("memory (CIFAR-10)", f"{p} process{'es' if p > 1 else ''}{how}, peak PSS (sum)",
               f"{job['total_peak_pss_mb']:.0f} MB ({private:.0f} MB private each)",
               f"peak RSS (sum) {job['total_peak_rss_mb']:.0f} MB",
               f"{job['pss_ratio']:.2f}" if "pss_ratio" in job else "",
               "<= 1.5" if p > 1 and "pss_ratio" in job else "")
        if p > 1 and "training_pss_ratio" in job:
            yield ("memory (CIFAR-10)", "  peak PSS (sum) while training, before train() returns (then every process "
                   "holds the trained model)", f"{job['total_training_peak_pss_mb']:.0f} MB",
                   f"1 process {mem['jobs']['1']['total_training_peak_pss_mb']:.0f} MB",
                   f"{job['training_pss_ratio']:.2f}", "")
        if "per_extra_process_mb" in job:
            yield ("memory (CIFAR-10)", f"each process beyond the first ({p} processes{how})",
                   f"{job['per_extra_process_mb']:.0f} MB", f"uint8 images, held once: {mem['dataset_mb']:.0f} MB",
                   "", "")


def table_rows(results):
    """(section, case, measured, compared with, ratio, target) for every result."""
    rows = list(_step_rows(results.get("step", [])))
    for key, make in (("torch", _torch_rows), ("distributed", _distributed_rows), ("memory", _memory_rows)):
        if results.get(key) is not None:
            rows += make(results[key])
    return rows


def print_table(rows, file=None):
    file = sys.stdout if file is None else file
    header = ("section", "case", "measured", "compared with", "ratio", "target")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    print(line(header), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    section = None
    for row in rows:
        print(line(row if row[0] != section else ("", *row[1:])), file=file)
        section = row[0]
