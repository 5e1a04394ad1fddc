"""The gradient exchange on an emulated cluster (launch/emulate.sh, as root), beside its alpha-beta-gamma model.

    python benchmarks/bench_cluster.py [--rates 1gbit 10gbit 25gbit none] [--nodes 1 2 4] [--hierarchical 2x2]
                                       [--steps 10] [--rounds 3] [--no-compute] [--json PATH]

1. The links, at each rate (none: unlimited, what this machine's CPUs carry): between 2 nodes, a ping-pong (half its
   round trip: one direction at a time) and an exchange (both send at once, as in the collectives) of 8 B to 16 MB.
   alpha = the 8-byte ping-pong, beta = the least-squares slope of the exchange over 1-16 MB (seconds per byte),
   gamma = the time per byte of adding two float32 vectors (the reduction's work).
2. The default model of `python -m dpnet.train` (FullyConnectedNet [1024, 512], batchnorm with its statistics summed
   over the processes, float32, global batch 256, sgd_momentum) on 1, 2, 4 nodes of one process at each rate: the
   training step (the Solver's, through the public exchange protocol; `rule` is the update rule's own time in it)
   and the exchange alone (after a barrier, on fresh gradients: reduce + update less the rule), for the default
   exchange (sharded: reduce-scatter + allgather) and MPICH's Allreduce (replicated, shared_memory=False), beside
   the model 2 (N - 1) alpha + 2 (N - 1) / N n beta + (N - 1) / N n gamma (ring allreduce, or reduce-scatter +
   allgather: Thakur, Rabenseifner & Gropp 2005).
3. On each --hierarchical shape (2 nodes x 2 processes): all four exchanges alternated in one job, summing in each
   node's shared memory first (dpnet's default across nodes) against MPI's collectives over every process.
4. One process at batch 32 to 256: step(b) = a + b s + rule, and from it the projection for 8-64 nodes on 10, 25
   and 100 GbE at the fixed global batch (docs/scaling.md).
Medians over --steps steps after --warmup, the variants alternated over --rounds; the worst rank counts.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EMULATE = REPO / "launch" / "emulate.sh"
SIZES = [8, 1 << 10, 1 << 16, 1 << 20, 1 << 22, 1 << 24]
VARIANTS = {"sharded": (True, True), "sharded-mpi": (True, False), "replicated": (False, True),
            "replicated-mpi": (False, False)}  # name -> (shard_optimizer, shared_memory)


# ----------------------------------------------------------------------------------------------- inside the jobs
def worker_link(spec):
    """Between ranks 0 and 1 (one per node), for every size: a ping-pong (half its round trip: one direction at a
    time) and an exchange (each sends and receives at once, as in the collectives); gamma from a float32 add.
    Rank 0 returns the median times."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    other = 1 - world.rank
    times, both = {}, {}
    for size in SIZES:
        buf, into = (np.ones(max(size // 4, 2), dtype=np.float32) for _ in range(2))
        samples, exchanges = [], []
        for i in range(spec["repeats"] + 1):
            world.Barrier()
            start = time.perf_counter()
            if world.rank == 0:
                world.Send(buf, dest=other)
                world.Recv(buf, source=other)
            else:
                world.Recv(buf, source=other)
                world.Send(buf, dest=other)
            middle = time.perf_counter()
            world.Barrier()
            exchange = time.perf_counter()
            world.Sendrecv(buf, dest=other, recvbuf=into, source=other)
            if i:
                samples.append((middle - start) / 2)
                exchanges.append(time.perf_counter() - exchange)
        times[size], both[size] = float(np.median(samples)), float(np.median(exchanges))
    a, b = np.ones(1 << 22, dtype=np.float32), np.ones(1 << 22, dtype=np.float32)
    adds = []
    for _ in range(10):
        start = time.perf_counter()
        a += b
        adds.append(time.perf_counter() - start)
    return dict(times=times, both=both, gamma=float(np.median(adds)) / a.nbytes) if world.rank == 0 else None


def worker_step(spec):
    """The default model's step and exchange for each variant, alternated; rank 0 returns the worst rank's medians."""
    from bench_sections.distributed_worker import minibatches, synthetic_data
    from bench_sections.exchange_step import ExchangeStep

    from dpnet import parallel
    from dpnet.config import DEFAULTS
    from dpnet.train import build_model

    parallel.set_blas_threads()
    comm = parallel.get_communicator()
    config = dict(DEFAULTS)
    batches = spec.get("batches", [config["batch_size"]])
    steps = {}
    for name in spec["variants"]:
        shard, shared = VARIANTS[name]
        model = build_model(config)
        if comm.size > 1:
            for param in model.bn_params:
                param["reducer"] = parallel.make_reducer(comm)
        step = ExchangeStep(model, config["update_rule"], {"learning_rate": 1e-4}, comm=comm, shard=shard,
                            shared_memory=shared)
        steps[name] = (step, type(step.exchange).__name__)
    X, y = synthetic_data(max(batches), config["dtype"])
    times = {(name, b): dict(step=[], rule=[], exchange=[], gradients=[]) for name in steps for b in batches}
    for round_ in range(spec["rounds"]):
        for name, (step, _) in steps.items() if round_ % 2 == 0 else reversed(steps.items()):
            for batch in batches:
                record = times[name, batch]
                draw = minibatches(X, y, batch, comm.rank, comm.size, seed=round_)
                for i in range(spec["warmup"] + spec["steps"]):
                    step.apply_seconds = 0.0
                    start = time.perf_counter()
                    X_mine, y_mine = next(draw)
                    step(X_mine, y_mine, len(y_mine) / batch)
                    if i >= spec["warmup"]:
                        record["step"].append(time.perf_counter() - start)
                        record["rule"].append(step.apply_seconds)
                for _ in range(spec["steps"] if comm.size > 1 else 0):
                    X_mine, y_mine = next(draw)
                    start = time.perf_counter()
                    loss, grads = step.gradients(X_mine, y_mine)
                    record["gradients"].append(time.perf_counter() - start)
                    comm.barrier()
                    step.apply_seconds = 0.0
                    start = time.perf_counter()
                    step.update(loss, grads, len(y_mine) / batch)
                    record["exchange"].append(time.perf_counter() - start - step.apply_seconds)
    gradient_bytes = int(sum(w.nbytes for w in next(iter(steps.values()))[0].model.params.values()))
    for step, _ in steps.values():
        step.release()
    medians = {f"{name}@{b}": {k: float(np.median(v)) if v else None for k, v in record.items()}
               for (name, b), record in times.items()}
    if comm.size == 1:
        everyone = [medians]
    else:
        everyone = comm.comm.gather(medians, root=0)
    if comm.rank != 0:
        return None
    worst = {key: {k: max((m[key][k] for m in everyone), default=None) if medians[key][k] is not None else None
                   for k in medians[key]} for key in medians}
    return dict(medians=worst, exchanges={name: cls for name, (_, cls) in steps.items()}, processes=comm.size,
                gradient_bytes=gradient_bytes)


# ----------------------------------------------------------------------------------------------- the model
GOODPUT = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 (with TCP timestamps): what a link rate carries


def fit_link(times):
    """(alpha, beta) from times by size (seconds): alpha the 8-byte time, beta the least-squares slope over 1-16 MB
    (seconds per byte)."""
    sizes = np.array([size for size in times if size >= 1 << 20], dtype=float)
    beta = float(np.polyfit(sizes, np.array([times[int(size)] for size in sizes]), 1)[0])
    return float(times[8]), beta


def predict(processes, nbytes, alpha, beta, gamma):
    """Seconds of a sum over `processes` of nbytes (ring allreduce, or reduce-scatter + allgather), the alpha-beta-
    gamma model: 2 (P - 1) alpha + 2 (P - 1) / P n beta + (P - 1) / P n gamma."""
    p = processes
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta + (p - 1) / p * nbytes * gamma


def compute_fit(job):
    """(a, s, rule) from the one-process job over batch sizes: the step less the rule's time is a + b s (seconds);
    rule is the update rule's own time (divided by the processes when the state is sharded)."""
    rows = sorted((int(key.split("@")[1]), m["step"], m["rule"]) for key, m in job["medians"].items())
    batches = np.array([b for b, _, _ in rows], dtype=float)
    s, a = np.polyfit(batches, np.array([step - rule for _, step, rule in rows]), 1)
    return float(a), float(s), float(np.median([rule for _, _, rule in rows]))


def project(results, nodes=(8, 16, 32, 64), gbits=(10, 25, 100), batch=256):
    """Rows (GbE, N, exchange ms, step ms, speedup, efficiency, batch per process below which the exchange takes
    longer than the computation) for the default model at a fixed global batch: N nodes of one process computing as
    this machine's one process does, links of the given rate carrying GOODPUT of it, alpha and gamma as measured."""
    compute = next(job for job in results["jobs"] if job.get("batches"))
    a, s, rule = compute_fit(compute)
    link = next(iter(results["links"].values()))
    nbytes = compute["gradient_bytes"]
    one = a + batch * s + rule
    rows = []
    for gbit in gbits:
        beta = 8 / (gbit * 1e9 * GOODPUT)
        for n in nodes:
            exchange = predict(n, nbytes, link["alpha"], beta, link["gamma"])
            step = a + batch / n * s + rule / n + exchange
            dominated = max(0.0, (exchange - a - rule / n) / s)
            rows.append((gbit, n, 1e3 * exchange, 1e3 * step, one / step, one / step / n, dominated))
    return dict(a=a, s=s, rule=rule, one=one, rows=rows)


# ----------------------------------------------------------------------------------------------- the jobs
def emulate(nodes, per_node, rate, kind, spec, folder, timeout=900):
    """Run `kind` of this script on an emulated cluster; its result (rank 0's)."""
    out = Path(folder) / f"{kind}-{time.perf_counter_ns()}.json"
    command = ["bash", str(EMULATE), str(nodes), str(per_node), "--rate", rate, "--script", __file__,
               "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "HYDRA_", "OMPI_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DPNET_BLAS_THREADS"):
        env.pop(var, None)  # emulate.sh gives each process cores / processes
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout or Ctrl-C: the launcher removes its cluster on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"failed (exit {proc.returncode}): {' '.join(command)}\n{stdout}{stderr}")
    return json.loads(out.read_text())


def shape(text):
    nodes, _, per_node = text.partition("x")
    if not (nodes.isdigit() and per_node.isdigit() and int(nodes) >= 2 and int(per_node) >= 2):
        raise argparse.ArgumentTypeError(f"expected NODESxPROCESSES with both at least 2, got {text!r}")
    return int(nodes), int(per_node)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit", "25gbit", "none"],
                        help="link rates as tc writes them; none: unlimited (what the machine's CPUs carry)")
    parser.add_argument("--nodes", nargs="*", type=int, default=[1, 2, 4], help="nodes of one process")
    parser.add_argument("--hierarchical", nargs="*", type=shape, default=[(2, 2)], metavar="NODESxPROCESSES",
                        help="shapes on which every exchange runs, at every rate")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="ping-pongs and exchanges per size")
    parser.add_argument("--no-compute", action="store_true", help="skip the one-process batch sizes (projection)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(HERE))
        result = {"link": worker_link, "step": worker_step}[args.worker](json.loads(args.spec))
        if result is not None:
            Path(args.out).write_text(json.dumps(result))
        return 0
    if os.geteuid() != 0:
        print("bench_cluster.py: the emulated cluster needs root (launch/emulate.sh)", file=sys.stderr)
        return 2
    spec = dict(steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    results = dict(links={}, jobs=[], date=time.strftime("%Y-%m-%d"), load_before=os.getloadavg())
    with tempfile.TemporaryDirectory() as folder:
        for rate in args.rates:
            link = emulate(2, 1, rate, "link", dict(repeats=args.repeats), folder)
            times, both = ({int(k): v for k, v in link[key].items()} for key in ("times", "both"))
            alpha, beta_one_way = fit_link(times)
            beta = fit_link(both)[1]
            results["links"][rate] = dict(alpha=alpha, beta=beta, beta_one_way=beta_one_way, gamma=link["gamma"],
                                          times=times, both=both)
            print(f"link {rate}: alpha {1e6 * alpha:.0f} us, 1/beta {1e-6 / beta:.0f} MB/s both ways at once "
                  f"({1e-6 / beta_one_way:.0f} one way)", file=sys.stderr, flush=True)
        configs = [(n, 1, rate, ["sharded", "replicated-mpi"]) for n in args.nodes
                   for rate in (args.rates if n > 1 else ["none"])]
        configs += [(n, p, rate, list(VARIANTS)) for n, p in args.hierarchical for rate in args.rates]
        if not args.no_compute:
            configs.append((1, 1, "none", ["sharded"], [32, 64, 128, 256]))
        for nodes, per_node, rate, variants, *batches in configs:
            job_spec = dict(spec, variants=variants, **({"batches": batches[0]} if batches else {}))
            job = emulate(nodes, per_node, rate, "step", job_spec, folder)
            job.update(nodes=nodes, per_node=per_node, rate=rate if nodes > 1 else None, batches=batches[0] if batches
                       else None)
            results["jobs"].append(job)
            print(f"{nodes} x {per_node} {rate}: done", file=sys.stderr, flush=True)
    results["load_after"] = os.getloadavg()
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def report(results):
    """Print the links' fit, the table of step and exchange times beside the model, and the projection."""
    print("rate      alpha (us)  1/beta both ways (MB/s)  one way (MB/s)  1/gamma (MB/s)")
    for rate, link in results["links"].items():
        print(f"{rate:<9} {1e6 * link['alpha']:>10.0f}  {1e-6 / link['beta']:>23.0f}  "
              f"{1e-6 / link['beta_one_way']:>14.0f}  {1e-6 / link['gamma']:>14.0f}")
    print("\nmodel: the exchange between the nodes, 2 (N - 1) alpha + 2 (N - 1) / N n beta + (N - 1) / N n gamma")
    print("nodes x procs  rate     variant (exchange)                           batch  step ms  rule ms  exchange ms"
          "  model ms  measured/model")
    for job in results["jobs"]:
        link = results["links"].get(job["rate"])
        for key, m in job["medians"].items():
            name, batch = key.split("@")
            model = exchange = ratio = ""
            if m["exchange"] is not None:
                exchange = f"{1e3 * m['exchange']:.1f}"
                seconds = predict(job["nodes"], job["gradient_bytes"], link["alpha"], link["beta"], link["gamma"])
                model, ratio = f"{1e3 * seconds:.1f}", f"{m['exchange'] / seconds:.2f}"
            label = f"{name} ({job['exchanges'][name]})"
            print(f"{job['nodes']} x {job['per_node']:<10} {job['rate'] or '-':<8} {label:<44} {batch:>5}  "
                  f"{1e3 * m['step']:>7.1f}  {1e3 * m['rule']:>7.1f}  {exchange:>11}  {model:>8}  {ratio:>14}")
    if any(job.get("batches") for job in results["jobs"]):
        projection = project(results)
        print(f"\none process: step(b) = {1e3 * projection['a']:.1f} ms + b x {1e3 * projection['s']:.3f} ms + "
              f"rule {1e3 * projection['rule']:.1f} ms (/ N sharded); at 256: {1e3 * projection['one']:.1f} ms")
        print("GbE  nodes  exchange ms  step ms  speedup  efficiency  exchange dominates below (samples/process)")
        for gbit, n, exchange, step, speedup, efficiency, dominated in projection["rows"]:
            print(f"{gbit:>3}  {n:>5}  {exchange:>11.1f}  {step:>7.1f}  {speedup:>7.2f}  {efficiency:>10.2f}  "
                  f"{dominated:>10.0f}")


if __name__ == "__main__":
    sys.exit(main())
