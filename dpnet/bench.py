"""Side-by-side measurements of dpnet's training step: ``python -m dpnet.bench``.

    python -m dpnet.bench [--sections step torch distributed memory] [--hidden-dims 512 512] [--batch-size 256]
                          [--threads 2] [--repeats 50] [--rounds 2] [--data-dir DIR] [--json PATH]

Prints one table of four sections, each measured side by side in one run (medians over repeated steps after warm-up;
what is compared is interleaved, so that whatever else the machine does slows both alike):

- step: dpnet's training step on FullyConnectedNet(hidden dims), synthetic CIFAR-shaped batch: forward, backward and
  the update (the Solver's own update path: in place for the built-in rules), against its BLAS floor, the time of
  exactly the matrix products the step performs (same shapes and dtype), the two alternating in this process.
  Target: step <= 1.10 x floor with sgd. With sgd a third contender runs in the same rotation: the step written out
  in plain NumPy without dpnet (bench.handwritten_step), the reference for what a separate update pass allows.
- torch: dpnet against PyTorch on CPU for the same MLP, dtype, batch, threads and update rule (sgd_momentum with
  momentum 0.9, adam; PyTorch's default optimizer implementations), each in its own process (two thread pools in one
  process would spin against each other), alternating in ABBA rounds. PyTorch is optional: without it the rows say
  how to get it. Target: dpnet ahead (aim for 1.3x).
- distributed: the Solver (float32, --distributed-rule, default sgd) as 1 process x T BLAS threads against P MPI
  processes x T/P threads, with the optimizer state replicated and sharded, each through shared memory (the default
  on one machine: dpnet.shared_sum, dpnet.sharding) and through MPI's collectives alone, alternating in forward and
  reversed order round by round; inside each process the communication (MPI's parameter-sized collectives: the fused
  gradient's Allreduce, sharded the reduce-scatter and the allgather; in shared memory the sums, copies and
  barriers) is timed where it happens (a rank waiting for a slower one counts as communication), its share of the
  step is that of the worst rank. Also the fused in-place Allreduce (packing included) against one pickled allreduce
  per gradient array, interleaved. Target: communication <= 10% of the step at 2 processes.
- memory: peak RSS and peak PSS (proportional set size, /proc/<pid>/smaps_rollup: shared pages, such as the
  memory-mapped CIFAR-10 cache in the page cache, divided among the processes mapping them; RSS counts them in every
  process) of 1 and of 4 processes (mpiexec) training the command line's default model and recipe
  (dpnet.config.DEFAULTS: optimizer state sharded, parameters and gradients in shared memory) on the full CIFAR-10
  for one short epoch of a few dozen steps (its end included: evaluation, replica check, state gathered for
  checkpoints, and the end of training), and of 4 processes again with MPI's collectives alone (a copy of the
  parameters per process), and with the state replicated; and what each process beyond the first adds. Target: 4 processes <= 1.5 x one process.

With --json PATH everything (per-step times included, and the environment: versions, BLAS, git commit, load
average) is written there, to compare runs across commits. Run on an otherwise idle machine; the load average is
printed before and after.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INPUT_SHAPE, NUM_CLASSES = (3, 32, 32), 10
SECTIONS = ("step", "torch", "distributed", "memory")
TORCH_HINT = "PyTorch is not installed: pip install torch==2.13.0 (takes a CPU build here)"
MPI_HINT = "needs mpi4py and mpiexec: pip install dpnet[mpi]"
LEARNING_RATES = {"sgd": 1e-4, "sgd_momentum": 1e-4, "rmsprop": 1e-4, "adam": 1e-4}
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")
_THREAD_VARS = ("DPNET_BLAS_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_REPO = Path(__file__).resolve().parents[1]  # the folder holding this dpnet package: on the workers' PYTHONPATH


def median_ms(values):
    return 1e3 * float(np.median(values))


def synthetic_batch(batch_size, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, *INPUT_SHAPE)).astype(dtype), rng.integers(NUM_CLASSES, size=batch_size)


# ----------------------------------------------------------------------------------------------- 1. step vs floor
def dpnet_step(hidden_dims, batch_size, dtype, rule):
    """(model, step): step() is one training step of dpnet on a fixed batch, as the Solver takes it: the model's loss
    with the gradients written into the Solver's buffer, then the Solver's update."""
    from .classifiers.fc_net import FullyConnectedNet
    from .distributed import SerialCommunicator
    from .solver import Solver

    model = FullyConnectedNet(hidden_dims, dtype=dtype, seed=0)
    X, y = synthetic_batch(batch_size, dtype)
    solver = Solver(model, dict(X_train=X, y_train=y, X_val=X[:1], y_val=y[:1]), update_rule=rule,
                    optim_config={"learning_rate": LEARNING_RATES.get(rule, 1e-4)}, batch_size=batch_size,
                    verbose=False, seed=0, comm=SerialCommunicator())

    def step():
        _, grads = solver._gradients(X, y)
        solver._update(grads)

    return model, step


def handwritten_gradients(weights, biases, X, y):
    """Gradients [(dW_L, db_L), ..., (dW_1, db_1)] (last layer first) of the mean softmax loss of an affine-ReLU MLP,
    written out in plain NumPy, nothing of dpnet's: ReLU in place, no gradient of the input X (N, D)."""
    batch_size = X.shape[0]
    activations = [X]
    for w, b in zip(weights[:-1], biases[:-1]):
        a = activations[-1] @ w
        a += b
        activations.append(np.maximum(a, 0, out=a))
    scores = activations[-1] @ weights[-1]
    scores += biases[-1]
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    scores[np.arange(batch_size), y] -= 1
    scores /= batch_size
    dout, grads = scores, []
    for i in range(len(weights) - 1, -1, -1):
        grads.append((activations[i].T @ dout, dout.sum(axis=0)))
        if i > 0:
            dout = dout @ weights[i].T
            dout *= activations[i] > 0
    return grads


def handwritten_step(model, batch_size, dtype, learning_rate=LEARNING_RATES["sgd"]):
    """The same MLP's training step with sgd in plain NumPy (handwritten_gradients, then w -= lr * dw), on its own
    copy of the model's parameters. The shortest honest program for this step: how close a library can get to the
    BLAS floor when the update is a separate pass over the parameters (it reads w and dw and writes w: memory-bound)."""
    X, y = synthetic_batch(batch_size, dtype)
    X = X.reshape(batch_size, -1)
    L = model.num_layers
    weights = [model.params[f"W{i}"].copy() for i in range(1, L + 1)]
    biases = [model.params[f"b{i}"].copy() for i in range(1, L + 1)]

    def step():
        grads = handwritten_gradients(weights, biases, X, y)
        for (dw, db), w, b in zip(grads, reversed(weights), reversed(biases)):
            w -= learning_rate * dw
            b -= learning_rate * db

    return step


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


def blas_floor(pairs):
    for a, b in pairs:
        a @ b


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_step(hidden_dims, batch_size, dtype, rule, repeats, warmup):
    """Medians of the step and of its BLAS floor (and, with sgd, of the hand-written NumPy step), alternating in this
    process (forward and reversed order in turn)."""
    model, step = dpnet_step(hidden_dims, batch_size, dtype, rule)
    pairs = blas_products(model, batch_size, dtype)
    order = [("step", step), ("floor", lambda: blas_floor(pairs))]
    if rule == "sgd":
        order.append(("handwritten", handwritten_step(model, batch_size, dtype)))
    runs = {name: [] for name, _ in order}
    for i in range(warmup + repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds = timed(fn)
            if i >= warmup:
                runs[name].append(seconds)
    step_ms, floor_ms = median_ms(runs["step"]), median_ms(runs["floor"])
    result = dict(dtype=np.dtype(dtype).name, rule=rule, step_ms=step_ms, floor_ms=floor_ms,
                  ratio=step_ms / floor_ms, samples_per_sec=batch_size / step_ms * 1e3, step_times=runs["step"],
                  floor_times=runs["floor"])
    if "handwritten" in runs:
        result.update(handwritten_ms=median_ms(runs["handwritten"]), handwritten_times=runs["handwritten"])
        result["handwritten_ratio"] = result["handwritten_ms"] / floor_ms
    return result


def section_step(args):
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for dtype in args.dtypes:
            for rule in args.rules:
                rows.append(measure_step(args.hidden_dims, args.batch_size, dtype, rule, args.repeats, args.warmup))
    return rows


# ----------------------------------------------------------------------------------------------- 2. against PyTorch
def torch_step(hidden_dims, batch_size, dtype, rule):
    """step() is one training step of the same MLP in PyTorch: zero_grad, forward, cross-entropy, backward, step."""
    import torch

    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
    dims = [int(np.prod(INPUT_SHAPE)), *hidden_dims, NUM_CLASSES]
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1]).to(torch_dtype)
    X, y = synthetic_batch(batch_size, dtype)
    X, y = torch.from_numpy(X.reshape(batch_size, -1)), torch.from_numpy(y)
    lr = LEARNING_RATES[rule]
    if rule == "sgd_momentum":
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    elif rule == "adam":
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(X), y).backward()
        optimizer.step()

    return step


def worker_framework(spec):
    """Inside a worker process: time every (dtype, rule) of one framework ("dpnet" or "torch")."""
    from .distributed import set_blas_threads

    set_blas_threads(spec["threads"])
    if spec["framework"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
        make = torch_step
    else:
        make = lambda *a: dpnet_step(*a)[1]  # noqa: E731
    results = {}
    for dtype in spec["dtypes"]:
        for rule in spec["rules"]:
            step = make(spec["hidden_dims"], spec["batch_size"], dtype, rule)
            times = [timed(step) for _ in range(spec["warmup"] + spec["repeats"])]
            results[f"{dtype} {rule}"] = times[spec["warmup"]:]
    info = {}
    if spec["framework"] == "torch":
        info = dict(version=torch.__version__, threads=torch.get_num_threads())
    return dict(times=results, info=info)


def section_torch(args):
    cases = [(dtype, rule) for dtype in args.dtypes for rule in args.torch_rules]
    if importlib.util.find_spec("torch") is None:
        return dict(available=False, note=TORCH_HINT,
                    rows=[dict(dtype=d, rule=r, note=TORCH_HINT) for d, r in cases])
    spec = dict(hidden_dims=args.hidden_dims, batch_size=args.batch_size, threads=args.threads,
                dtypes=args.dtypes, rules=args.torch_rules, warmup=args.warmup, repeats=args.repeats)
    runs = {"dpnet": [], "torch": []}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for framework in ("dpnet", "torch") if r % 2 == 0 else ("torch", "dpnet"):  # ABBA
                _progress(f"torch section, round {r + 1}/{args.rounds}: {framework}")
                runs[framework].append(run_worker("framework", dict(spec, framework=framework), folder,
                                                  threads=args.threads))
    rows = []
    for dtype, rule in cases:
        key = f"{dtype} {rule}"
        ours = [t for run in runs["dpnet"] for t in run["times"][key]]
        theirs = [t for run in runs["torch"] for t in run["times"][key]]
        dpnet_ms, torch_ms = median_ms(ours), median_ms(theirs)
        rows.append(dict(dtype=dtype, rule=rule, dpnet_ms=dpnet_ms, torch_ms=torch_ms,
                         dpnet_samples_per_sec=args.batch_size / dpnet_ms * 1e3,
                         torch_samples_per_sec=args.batch_size / torch_ms * 1e3, speedup=torch_ms / dpnet_ms,
                         dpnet_ms_per_round=[median_ms(run["times"][key]) for run in runs["dpnet"]],
                         torch_ms_per_round=[median_ms(run["times"][key]) for run in runs["torch"]]))
    return dict(available=True, torch=runs["torch"][0]["info"], rows=rows)


# ----------------------------------------------------------------------------------------------- 3. 1 process vs P
def worker_distributed(spec):
    """Inside each process of a job: train with the Solver, timing every step and its communication: MPI's
    parameter-sized collectives (the fused gradient's Allreduce; sharded, the reduce-scatter and the allgather) or,
    in shared memory, the sums and copies of dpnet.shared_sum and every barrier."""
    from .classifiers.fc_net import FullyConnectedNet
    from .distributed import NodeSharedArray, get_communicator, set_blas_threads
    from .shared_sum import SharedSum
    from .solver import Solver

    set_blas_threads(spec["threads"])
    comm = get_communicator()
    step_times, comm_times, solver_allreduce_times = [], [], []
    big = spec["gradient_size"] // 2  # only the gradient and parameter buffers are this large (others: a few counts)
    in_step = [0.0]  # time spent communicating during the current step
    depth = [0]  # a timed call inside a timed call (a barrier inside a sum) is not counted twice

    def count_as_communication(call, *args, **kwargs):
        if depth[0]:
            return call(*args, **kwargs)
        depth[0] += 1
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            in_step[0] += time.perf_counter() - start
            depth[0] -= 1

    def timed_collective(call, buf, *args):
        if buf.size < big:
            return call(buf, *args)
        return count_as_communication(call, buf, *args)

    class TimedComm:
        """The communicator, with the time of its parameter-sized collectives recorded."""

        def __getattr__(self, name):
            return getattr(comm, name)

        def allreduce(self, buf, op="sum"):
            return timed_collective(comm.allreduce, buf, op)

        def reduce_scatter(self, sendbuf, recvbuf, counts):
            timed_collective(lambda b, *a: comm.reduce_scatter(b, recvbuf, counts), sendbuf)
            return recvbuf

        def allgather(self, buf, counts):
            return timed_collective(comm.allgather, buf, counts)

    # In this worker process only: shared memory's sums, copies and barriers replace collectives, so they count.
    def timed_method(method):
        return lambda self, *args, **kwargs: count_as_communication(method, self, *args, **kwargs)

    for cls, name in ((NodeSharedArray, "sync"), (SharedSum, "sum_block"), (SharedSum, "gather")):
        setattr(cls, name, timed_method(getattr(cls, name)))

    class TimedSolver(Solver):
        shared_memory_was_used = False

        def _step(self):
            in_step[0] = 0.0
            start = time.perf_counter()
            result = super()._step()
            self.shared_memory_was_used |= (self._shared_sum is not None
                                            or self._shards is not None and self._shards.shared)
            step_times.append(time.perf_counter() - start)
            comm_times.append(in_step[0])
            return result

        def _allreduce(self, *args):
            start = time.perf_counter()
            result = super()._allreduce(*args)
            solver_allreduce_times.append(time.perf_counter() - start)
            return result

    batch, dtype = spec["batch_size"], np.dtype(spec["dtype"])
    steps_per_epoch = 8
    rng = np.random.default_rng(0)
    n_train = batch * steps_per_epoch
    input_dim = int(np.prod(INPUT_SHAPE))
    data = dict(X_train=rng.standard_normal((n_train, input_dim)).astype(dtype),
                y_train=rng.integers(NUM_CLASSES, size=n_train),
                X_val=rng.standard_normal((batch, input_dim)).astype(dtype),
                y_val=rng.integers(NUM_CLASSES, size=batch))
    model = FullyConnectedNet(spec["hidden_dims"], dtype=dtype, seed=0)
    total = spec["warmup"] + spec["repeats"]
    solver = TimedSolver(model, data, update_rule=spec["rule"], optim_config={"learning_rate": 1e-4},
                         batch_size=batch, num_epochs=-(-total // steps_per_epoch), num_train_samples=batch, seed=0,
                         comm=TimedComm() if comm.size > 1 else comm, verbose=False,
                         shard_optimizer=spec.get("shard_optimizer", False),
                         shared_memory=spec.get("shared_memory", True))
    solver.train()
    steps = np.array(step_times[spec["warmup"]:total])
    result = dict(rank=comm.rank, steps=steps.tolist())
    if comm.size == 1:
        return [result]
    reduces = np.array(comm_times[spec["warmup"]:total])
    result.update(allreduce=reduces.tolist(), share=float(np.median(reduces / steps)),
                  shared_memory=bool(solver.shared_memory_was_used))
    if spec.get("shard_optimizer"):
        return comm.comm.gather(result, root=0)
    packed = np.array(solver_allreduce_times[spec["warmup"]:total])
    result.update(solver_allreduce=packed.tolist(), solver_share=float(np.median(packed / steps)))
    if spec.get("shared_memory", True):
        return comm.comm.gather(result, root=0)
    result.update(compare_fused_and_pickled(comm, model, data, spec["allreduce_repeats"]))
    import mpi4py

    result.update(mpi4py=mpi4py.__version__, mpi=comm._MPI.Get_library_version().strip().splitlines()[0])
    return comm.comm.gather(result, root=0)


def compare_fused_and_pickled(comm, model, data, repeats):
    """Interleaved timings of the fused in-place Allreduce (packing included; and the Allreduce call alone) and of
    one pickled allreduce (mpi4py's lower-case comm.allreduce) per gradient array."""
    from .distributed import FusedBuffer

    rows = slice(0, len(data["y_val"]) // comm.size)
    _, grads = model.loss(data["X_train"][rows], data["y_train"][rows])
    fused = FusedBuffer(grads, extra=1)
    times = {"fused": [], "reduce_only": [], "pickled": []}

    def run_pickled():
        for name in sorted(grads):
            comm.comm.allreduce(grads[name])

    order = (("fused", lambda: comm.allreduce(fused.pack(grads, 1 / comm.size))),
             ("reduce_only", lambda: comm.allreduce(fused.buffer)), ("pickled", run_pickled))
    for i in range(repeats + 2):
        for kind, run in order if i % 2 == 0 else order[::-1]:
            comm.barrier()
            seconds = timed(run)
            if i >= 2:  # the first two rounds are warm-up
                times[kind].append(seconds)
    return dict(**times, gradient_bytes=int(fused.buffer.nbytes), gradient_arrays=len(grads))


# name -> (shard_optimizer, shared_memory) of the P-process jobs of the distributed section
DISTRIBUTED_CASES = {"replicated": (False, True), "replicated_mpi": (False, False), "sharded": (True, True),
                     "sharded_mpi": (True, False)}


def section_distributed(args):
    if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
        return dict(available=False, note=MPI_HINT)
    P, T = args.processes, args.threads
    t = max(1, T // P)
    configs = {"serial": (1, T, False, True), **{name: (P, t, *how) for name, how in DISTRIBUTED_CASES.items()}}
    from .classifiers.fc_net import FullyConnectedNet

    gradient_size = sum(p.size for p in FullyConnectedNet(args.hidden_dims, dtype=np.float32).params.values())
    spec = dict(hidden_dims=args.hidden_dims, batch_size=args.batch_size, dtype="float32", rule=args.distributed_rule,
                warmup=args.warmup, repeats=args.repeats, allreduce_repeats=args.allreduce_repeats,
                gradient_size=gradient_size)
    runs = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:  # ABBA
                p, t, shard, shared = configs[name]
                _progress(f"distributed section, round {r + 1}/{args.rounds}: {p} x {t} threads"
                          f"{', optimizer state sharded' if shard else ''}"
                          f"{', MPI collectives only' if p > 1 and not shared else ''}")
                runs[name].append(run_worker("distributed", dict(spec, threads=t, shard_optimizer=shard,
                                                                 shared_memory=shared), folder, threads=t, processes=p))
    serial = [t for run in runs["serial"] for t in run[0]["steps"]]
    cases = {}
    for name in DISTRIBUTED_CASES:
        steps = [t for run in runs[name] for t in run[0]["steps"]]
        cases[name] = dict(
            step_ms=median_ms(steps), speedup=float(np.median(serial) / np.median(steps)),
            step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs[name]],
            comm_share=float(np.median([max(rank["share"] for rank in run) for run in runs[name]])),
            comm_ms=median_ms([t for run in runs[name] for rank in run for t in rank["allreduce"]]),
            shared_memory=all(rank["shared_memory"] for run in runs[name] for rank in run))
        if not DISTRIBUTED_CASES[name][0]:  # replicated: all of Solver._allreduce (packing included) too
            cases[name]["solver_allreduce_share"] = float(np.median(
                [max(rank["solver_share"] for rank in run) for run in runs[name]]))
    first = runs["replicated_mpi"][0][0]
    collect = lambda key: [t for run in runs["replicated_mpi"] for t in run[0][key]]  # noqa: E731
    return dict(
        available=True, processes=P, threads=T, rule=args.distributed_rule, dtype="float32",
        serial_step_ms=median_ms(serial),
        serial_step_ms_per_round=[median_ms(run[0]["steps"]) for run in runs["serial"]], cases=cases,
        fused_ms=median_ms(collect("fused")), reduce_only_ms=median_ms(collect("reduce_only")),
        pickled_ms=median_ms(collect("pickled")),
        fused_speedup=float(np.median(collect("pickled")) / np.median(collect("fused"))),
        gradient_megabytes=first["gradient_bytes"] / 1e6, gradient_arrays=first["gradient_arrays"],
        mpi=first["mpi"], mpi4py=first["mpi4py"], runs=runs)


# ----------------------------------------------------------------------------------------------- 4. memory
def memory_now():
    """(RSS, PSS, USS) of this process now, in MB, from /proc/self/smaps_rollup (Nones where there is none). USS is
    the memory private to the process (Private_Clean + Private_Dirty): what one more process costs."""
    keys = ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:")
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {parts[0]: int(parts[1]) / 1024 for parts in map(str.split, f) if parts and parts[0] in keys}
    except OSError:
        return None, None, None
    return fields["Rss:"], fields["Pss:"], fields["Private_Clean:"] + fields["Private_Dirty:"]


def worker_memory(spec):
    """Inside each process of a job: train the command line's default model on CIFAR-10 for a few steps, sampling
    PSS after every step; then, with every process still alive, the final PSS and the peak RSS."""
    from .data_utils import locate_CIFAR10
    from .distributed import get_communicator, set_blas_threads
    from .solver import Solver
    from .config import DEFAULTS
    from .train import build_model, load_data

    comm = get_communicator()
    set_blas_threads(comm=comm)
    config = dict(DEFAULTS, hidden_dims=spec["hidden_dims"])
    data = load_data(locate_CIFAR10(spec["data_dir"], download=False), config)
    peak_pss = [0.0]

    class SampledSolver(Solver):
        iterations_per_epoch = spec["steps"]  # one short epoch: its end (evaluation, checks, gathers) is measured too

        def _step(self):
            result = super()._step()
            peak_pss[0] = max(peak_pss[0], memory_now()[1] or 0.0)
            return result

        def _end_epoch(self):
            super()._end_epoch()
            peak_pss[0] = max(peak_pss[0], memory_now()[1] or 0.0)

    solver = SampledSolver(build_model(config), data, update_rule=config["update_rule"],
                           optim_config={"learning_rate": config["lr"]}, batch_size=config["batch_size"],
                           num_epochs=1, num_train_samples=1000, num_val_samples=None, verbose=False, seed=0,
                           comm=comm, weight_decay=config["weight_decay"], shard_optimizer=spec["shard_optimizer"],
                           shared_memory=spec.get("shared_memory", True))
    solver.train()
    comm.barrier()
    rss, pss, uss = memory_now()
    result = dict(rank=comm.rank, steps=solver.iteration, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024, rss_mb=rss, pss_mb=pss, uss_mb=uss, peak_pss_mb=max(peak_pss[0], pss or 0.0))
    comm.barrier()  # nobody exits (unmapping shared pages) before everyone has read its PSS
    return comm.comm.gather(result, root=0) if comm.size > 1 else [result]


def section_memory(args):
    from .data_utils import CIFAR10NotFoundError, load_CIFAR10_raw, locate_CIFAR10

    try:
        images = load_CIFAR10_raw(locate_CIFAR10(args.data_dir, download=False))  # builds the shared cache if missing
    except (CIFAR10NotFoundError, OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return dict(available=False, note=f"needs CIFAR-10: give --data-dir ({first_line})")
    if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
        return dict(available=False, note=MPI_HINT)
    from .config import DEFAULTS

    hidden = args.memory_hidden_dims if args.memory_hidden_dims is not None else DEFAULTS["hidden_dims"]
    spec = dict(data_dir=args.data_dir and str(args.data_dir), hidden_dims=hidden, steps=args.memory_steps)
    runs = [(str(p), p, DEFAULTS["shard_optimizer"], True) for p in args.memory_processes]
    p = max(args.memory_processes)
    if DEFAULTS["shard_optimizer"] and p > 1:  # the largest job again with MPI alone, and with the whole state
        runs += [(f"{p}-unshared", p, True, False), (f"{p}-replicated", p, False, True)]
    jobs = {}
    with tempfile.TemporaryDirectory() as folder:
        for key, p, shard, share in runs:
            _progress(f"memory section: {p} process{'es' if p > 1 else ''}"
                      f"{', optimizer state replicated' if p > 1 and not shard else ''}"
                      f"{', MPI only' if p > 1 and shard and not share else ''}")
            ranks = run_worker("memory", dict(spec, shard_optimizer=shard, shared_memory=share), folder, processes=p,
                               mpi=True)
            jobs[key] = dict(processes=p, shard_optimizer=shard and p > 1, shared_memory=share and shard and p > 1,
                             ranks=ranks,
                             total_peak_rss_mb=sum(r["peak_rss_mb"] for r in ranks),
                             total_peak_pss_mb=sum(r["peak_pss_mb"] for r in ranks),
                             total_pss_mb=sum(r["pss_mb"] or 0.0 for r in ranks))
    one = jobs.get("1")
    for job in jobs.values():
        if one is not None:
            job["pss_ratio"] = job["total_peak_pss_mb"] / one["total_peak_pss_mb"]
            job["rss_ratio"] = job["total_peak_rss_mb"] / one["total_peak_rss_mb"]
            if job["processes"] > 1:  # what each process beyond the first adds: its own private memory
                job["per_extra_process_mb"] = ((job["total_peak_pss_mb"] - one["total_peak_pss_mb"])
                                               / (job["processes"] - 1))
    model = dict((k, DEFAULTS[k]) for k in ("normalization", "dropout", "update_rule", "batch_size", "dtype",
                                             "weight_decay"))
    dataset_mb = (images[0].nbytes + images[2].nbytes) / 2**20
    return dict(available=True, hidden_dims=hidden, steps=args.memory_steps, model=model, jobs=jobs,
                dataset_mb=dataset_mb)


# ----------------------------------------------------------------------------------------------- workers
def mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.is_file() else shutil.which("mpiexec")


def run_worker(kind, spec, folder, threads=None, processes=1, mpi=False):
    """Run `python -m dpnet.bench --worker kind` (under mpiexec -n processes when processes > 1 or mpi) with a clean
    environment (no launcher variables; thread counts set) and return what it wrote."""
    out = Path(folder) / f"{kind}-{time.perf_counter_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "dpnet.bench", "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)]
    if processes > 1 or mpi:
        command = [mpiexec(), "-n", str(processes), *command]
    result = subprocess.run(command, env=env, timeout=1800, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {kind} worker failed (exit {result.returncode}): {' '.join(command)}\n"
                           f"{result.stdout}{result.stderr}")
    return json.loads(out.read_text())


_WORKERS = {"framework": worker_framework, "distributed": worker_distributed, "memory": worker_memory}


def worker_main(kind, spec, out):
    result = _WORKERS[kind](json.loads(spec))
    if result is not None:  # None on the ranks other than 0
        Path(out).write_text(json.dumps(result))


def _progress(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- report
def environment():
    from threadpoolctl import threadpool_info

    env = dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
               cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               blas=[{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                     for info in threadpool_info() if info["user_api"] == "blas"],
               OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE"))
    try:
        commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            env.update(git_commit=commit.stdout.strip(), git_dirty=bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    for module in ("mpi4py", "torch"):
        if importlib.util.find_spec(module) is not None:
            env[module] = "installed"  # versions are read in the workers (importing torch here costs seconds)
    return env


def table_rows(results, args):
    """(section, case, measured, compared with, ratio, target) for every result."""
    rows = []
    for r in results.get("step", []):
        target = "<= 1.10" if r["rule"] == "sgd" else ""
        rows.append(("step vs BLAS floor", f"{r['dtype']} {r['rule']}",
                     f"{r['step_ms']:.2f} ms ({r['samples_per_sec']:,.0f}/s)", f"floor {r['floor_ms']:.2f} ms",
                     f"{r['ratio']:.3f}", target))
        if "handwritten_ms" in r:
            rows.append(("step vs BLAS floor", f"{r['dtype']} {r['rule']}, hand-written NumPy",
                         f"{r['handwritten_ms']:.2f} ms", f"floor {r['floor_ms']:.2f} ms",
                         f"{r['handwritten_ratio']:.3f}", "(reference)"))
    torch = results.get("torch")
    if torch is not None:
        for r in torch["rows"]:
            case = f"{r['dtype']} {r['rule']}"
            if "note" in r:
                rows.append(("dpnet vs PyTorch", case, "-", r["note"], "", "> 1 (aim 1.3)"))
                continue
            rows.append(("dpnet vs PyTorch", case, f"{r['dpnet_ms']:.2f} ms ({r['dpnet_samples_per_sec']:,.0f}/s)",
                         f"torch {r['torch_ms']:.2f} ms ({r['torch_samples_per_sec']:,.0f}/s)",
                         f"{r['speedup']:.2f}x", "> 1 (aim 1.3)"))
    dist = results.get("distributed")
    if dist is not None and not dist["available"]:
        rows.append(("1 vs P processes", "-", "-", dist["note"], "", ""))
    elif dist is not None:
        P, T = dist["processes"], dist["threads"]
        label = f"{dist['rule']}, {P} x {max(1, T // P)} thread{'s' if T // P > 1 else ''} vs 1 x {T}"
        what = {"replicated": ("state replicated, gradients summed in shared memory", "sums and barriers share"),
                "replicated_mpi": ("state replicated, MPI only", "Allreduce share"),
                "sharded": ("state sharded, parameters and gradients in shared memory", "sums and barriers share"),
                "sharded_mpi": ("state sharded, MPI only", "reduce-scatter + allgather share")}
        for name, case in dist["cases"].items():
            how, communication = what[name]
            if not case["shared_memory"] and name in ("replicated", "sharded"):
                how += " (none available: MPI)"
            rows.append(("1 vs P processes", f"step, {label}, {how}", f"{case['step_ms']:.2f} ms",
                         f"{dist['serial_step_ms']:.2f} ms", f"{case['speedup']:.2f}x", ""))
            extra = (f"Solver._allreduce {100 * case['solver_allreduce_share']:.1f}%"
                     if "solver_allreduce_share" in case else "")
            rows.append(("1 vs P processes", f"  {communication}, {P} processes", f"{case['comm_ms']:.2f} ms of the step",
                         extra, f"{100 * case['comm_share']:.1f}%", "<= 10%"))
        rows.append(("1 vs P processes", f"fused vs pickled ({dist['gradient_megabytes']:.1f} MB)",
                     f"{dist['fused_ms']:.2f} ms (call alone {dist['reduce_only_ms']:.2f})",
                     f"pickled {dist['pickled_ms']:.2f} ms", f"{dist['fused_speedup']:.1f}x", ""))
    mem = results.get("memory")
    if mem is not None and not mem["available"]:
        rows.append(("memory (CIFAR-10)", "-", "-", mem["note"], "", ""))
    elif mem is not None:
        for job in mem["jobs"].values():
            p = job["processes"]
            private = np.mean([r["uss_mb"] or 0.0 for r in job["ranks"]])
            how = ("" if p == 1 else ", state replicated" if not job.get("shard_optimizer")
                   else ", state sharded, shared memory" if job.get("shared_memory") else ", state sharded, MPI only")
            rows.append(("memory (CIFAR-10)", f"{p} process{'es' if p > 1 else ''}{how}, peak PSS (sum)",
                         f"{job['total_peak_pss_mb']:.0f} MB ({private:.0f} MB private each)",
                         f"peak RSS (sum) {job['total_peak_rss_mb']:.0f} MB",
                         f"{job['pss_ratio']:.2f}" if "pss_ratio" in job else "",
                         "<= 1.5" if p > 1 and "pss_ratio" in job else ""))
            if "per_extra_process_mb" in job:
                rows.append(("memory (CIFAR-10)", f"each process beyond the first ({p} processes{how})",
                             f"{job['per_extra_process_mb']:.0f} MB",
                             f"uint8 images, held once: {mem['dataset_mb']:.0f} MB", "", ""))
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


# ----------------------------------------------------------------------------------------------- the command
def build_parser():
    parser = argparse.ArgumentParser(prog="python -m dpnet.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512],
                        help="hidden layers of the MLP of every section but memory")
    parser.add_argument("--batch-size", type=int, default=256, help="(global) minibatch size")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    parser.add_argument("--rules", nargs="+", default=["sgd", "sgd_momentum", "adam"], help="update rules of 'step'")
    parser.add_argument("--torch-rules", nargs="+", choices=("sgd", "sgd_momentum", "adam"),
                        default=["sgd_momentum", "adam"], help="update rules of 'torch'")
    parser.add_argument("--threads", type=int, default=2, help="BLAS (and PyTorch) threads of one process")
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded before measuring")
    parser.add_argument("--repeats", type=int, default=50, help="steps measured per configuration (and round)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the torch and distributed sections")
    parser.add_argument("--processes", type=int, default=2, help="processes of the distributed section")
    parser.add_argument("--distributed-rule", default="sgd", help="update rule of the distributed section")
    parser.add_argument("--allreduce-repeats", type=int, default=30, help="fused/pickled Allreduce repetitions")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="CIFAR-10 for the memory section (None: $DPNET_DATA_DIR, else dpnet's data folder)")
    parser.add_argument("--memory-processes", type=int, nargs="+", default=[1, 4], help="jobs of the memory section")
    parser.add_argument("--memory-steps", type=int, default=40, help="training steps of each memory job")
    parser.add_argument("--memory-hidden-dims", type=int, nargs="+", default=None,
                        help="model of the memory section (default: the command line's, dpnet.config.DEFAULTS)")
    parser.add_argument("--json", type=Path, help="write the results (and per-step times) to this JSON file")
    parser.add_argument("--worker", choices=sorted(_WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.out)
    load_before = os.getloadavg()[0]
    results = dict(environment=environment(), config={k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items() if v is not None})
    sections = dict(step=section_step, torch=section_torch, distributed=section_distributed, memory=section_memory)
    for name in SECTIONS:
        if name in args.sections:
            _progress(f"measuring: {name}")
            results[name] = sections[name](args)
    results["environment"]["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"dpnet.bench {' '.join(args.sections)}: FullyConnectedNet({args.hidden_dims}), batch {args.batch_size}, "
          f"{args.threads} threads; medians of {args.repeats} steps after {args.warmup} warm-up (x {args.rounds} "
          f"ABBA rounds for torch and distributed)")
    print(f"load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on "
          f"{results['environment']['cpus']} CPUs (anything else running makes these figures noisy)")
    print_table(table_rows(results, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
