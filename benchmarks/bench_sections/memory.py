"""Section `memory`: peak memory (RSS, PSS) of 1 and of 4 processes training on CIFAR-10."""

import importlib.util
import resource
import tempfile

from .common import MPI_HINT, progress
from .workers import mpiexec, run_worker


def memory_now(pid="self"):
    """(RSS, PSS, USS) of this process (or of process `pid`) now, in MB, from /proc/<pid>/smaps_rollup (Nones where
    there is none). USS is the memory private to the process (Private_Clean + Private_Dirty): what one more process
    costs."""
    keys = ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:")
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {parts[0]: int(parts[1]) / 1024 for parts in map(str.split, f) if parts and parts[0] in keys}
    except OSError:
        return None, None, None
    return fields["Rss:"], fields["Pss:"], fields["Private_Clean:"] + fields["Private_Dirty:"]


def worker_memory(spec):
    """Inside each process of a job: train the command line's default model on CIFAR-10 for one short epoch of
    spec["steps"] steps, sampling PSS after every call of the model's loss (each step's forward and backward, each
    batch of the epoch end's evaluation: the peak while training); then, with every process still alive and holding
    the trained model, the final PSS and the peak RSS. No monitor: as in a script, nothing is gathered for one."""
    from dpnet.config import DEFAULTS
    from dpnet.data_utils import locate_CIFAR10
    from dpnet.parallel import get_communicator, set_blas_threads
    from dpnet.solver import Solver
    from dpnet.train import build_model, load_data

    comm = get_communicator()
    set_blas_threads(comm=comm)
    config = dict(DEFAULTS, hidden_dims=spec["hidden_dims"])
    data = load_data(locate_CIFAR10(spec["data_dir"], download=False), config)
    model = build_model(config)
    peak_pss = [0.0]
    loss = model.loss

    def sampled_loss(X, y=None, grads=None):  # the model's own loss, PSS sampled when it returns
        result = loss(X, y, grads=grads)
        peak_pss[0] = max(peak_pss[0], memory_now()[1] or 0.0)
        return result

    model.loss = sampled_loss

    class OneShortEpoch(Solver):
        """The Solver with an epoch of spec["steps"] steps drawn from the whole training set, so that the epoch's
        end (evaluation, replica check) and the end of training are measured too."""

        iterations_per_epoch = spec["steps"]

    solver = OneShortEpoch(model, data, update_rule=config["update_rule"], optim_config={"learning_rate": config["lr"]},
                           batch_size=config["batch_size"], num_epochs=1, num_train_samples=1000,
                           num_val_samples=None, verbose=False, seed=0, comm=comm,
                           weight_decay=config["weight_decay"], shard_optimizer=spec["shard_optimizer"],
                           shared_memory=spec.get("shared_memory", True))
    solver.train()
    comm.barrier()
    rss, pss, uss = memory_now()  # after train(): each process holds the trained model (rank 0: the kept ones too)
    result = dict(rank=comm.rank, steps=solver.iteration, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024, rss_mb=rss, pss_mb=pss, uss_mb=uss, training_peak_pss_mb=peak_pss[0],
                  peak_pss_mb=max(peak_pss[0], pss or 0.0))
    comm.barrier()  # nobody exits (unmapping shared pages) before everyone has read its PSS
    return comm.comm.gather(result, root=0) if comm.size > 1 else [result]


def _summary(p, shard, share, ranks):
    return dict(processes=p, shard_optimizer=shard and p > 1, shared_memory=share and shard and p > 1, ranks=ranks,
                total_peak_rss_mb=sum(r["peak_rss_mb"] for r in ranks),
                total_peak_pss_mb=sum(r["peak_pss_mb"] for r in ranks),
                total_training_peak_pss_mb=sum(r["training_peak_pss_mb"] for r in ranks),
                total_pss_mb=sum(r["pss_mb"] or 0.0 for r in ranks))


def section_memory(args):
    from dpnet.data_utils import CIFAR10NotFoundError, load_CIFAR10_raw, locate_CIFAR10

    try:
        images = load_CIFAR10_raw(locate_CIFAR10(args.data_dir, download=False))  # builds the shared cache if missing
    except (CIFAR10NotFoundError, OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return dict(available=False, note=f"needs CIFAR-10: give --data-dir ({first_line})")
    if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
        return dict(available=False, note=MPI_HINT)
    from dpnet.config import DEFAULTS

    hidden = args.memory_hidden_dims if args.memory_hidden_dims is not None else DEFAULTS["hidden_dims"]
    spec = dict(data_dir=args.data_dir and str(args.data_dir), hidden_dims=hidden, steps=args.memory_steps)
    runs = [(str(p), p, DEFAULTS["shard_optimizer"], True) for p in args.memory_processes]
    p = max(args.memory_processes)
    if DEFAULTS["shard_optimizer"] and p > 1:  # the largest job again with MPI alone, and with the whole state
        runs += [(f"{p}-unshared", p, True, False), (f"{p}-replicated", p, False, True)]
    jobs = {}
    with tempfile.TemporaryDirectory() as folder:
        for key, p, shard, share in runs:
            progress(f"memory section: {p} process{'es' if p > 1 else ''}"
                     f"{', optimizer state replicated' if p > 1 and not shard else ''}"
                     f"{', MPI only' if p > 1 and shard and not share else ''}")
            ranks = run_worker("memory", dict(spec, shard_optimizer=shard, shared_memory=share), folder, processes=p,
                               mpi=True)
            jobs[key] = _summary(p, shard, share, ranks)
    one = jobs.get("1")
    for job in jobs.values():
        if one is not None:
            job["pss_ratio"] = job["total_peak_pss_mb"] / one["total_peak_pss_mb"]
            job["training_pss_ratio"] = job["total_training_peak_pss_mb"] / one["total_training_peak_pss_mb"]
            job["rss_ratio"] = job["total_peak_rss_mb"] / one["total_peak_rss_mb"]
            if job["processes"] > 1:  # what each process beyond the first adds: its own private memory
                job["per_extra_process_mb"] = ((job["total_peak_pss_mb"] - one["total_peak_pss_mb"])
                                               / (job["processes"] - 1))
    model = dict((k, DEFAULTS[k]) for k in ("normalization", "dropout", "update_rule", "batch_size", "dtype",
                                             "weight_decay"))
    dataset_mb = (images[0].nbytes + images[2].nbytes) / 2**20
    return dict(available=True, hidden_dims=hidden, steps=args.memory_steps, model=model, jobs=jobs,
                dataset_mb=dataset_mb)
