"""The command line: train a FullyConnectedNet on CIFAR-10, in one process or many.

    python -m dpnet.train                          # the tuned default run (also installed as `dpnet-train`)
    mpiexec -n 4 python -m dpnet.train --epochs 5  # four processes, data parallel (global batch unchanged)
    python -m dpnet.train --config configs/smoke.toml
    python -m dpnet.train --resume runs/<run>/last.npz

A run writes into its log directory (default `runs/<timestamp>-<short config>`): the TensorBoard event file, the
resolved configuration (`config.toml`, reusable with --config), the checkpoints `last.npz` and `best.npz`, and the
loss/accuracy plot `curves.png`. It ends by printing the test accuracy of the best parameters (by validation
accuracy). Only rank 0 prints and writes.

Configuration: DEFAULTS below, then the configuration saved in the --resume checkpoint, then the --config TOML file
(its keys are the flag names, with '-' or '_'), then the flags given. A resumed run continues the saved configuration;
only the keys in RESUME_MAY_CHANGE may differ from it.

Exit codes: 0 done; 2 bad input (nothing was trained); 3 the loss or the parameters became NaN or inf (the last good
checkpoint is kept); 130 interrupted (Ctrl-C).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

# The tuned configuration of a bare `python -m dpnet.train`, mirrored in configs/default.toml (tests check the two
# agree). Change both together.
DEFAULTS = dict(
    data_dir=None,
    download=False,
    num_train=49000,
    hidden_dims=[1024, 512],
    activation="relu",
    normalization="batchnorm",
    dropout=1.0,
    reg=0.0,
    weight_scale=2e-2,
    loss="softmax",
    update_rule="sgd_momentum",
    lr=5e-2,
    lr_decay=0.95,
    lr_schedule="cosine",
    lr_milestones=[],
    warmup_epochs=2.0,
    weight_decay=5e-3,
    label_smoothing=0.1,
    augment=True,
    crop_padding=4,
    batch_size=256,
    epochs=100,
    dtype="float32",
    seed=0,
    logdir=None,
    checkpoint_dir=None,
    checkpoint_every=1,
    resume=None,
    quiet=False,
    blas_threads=None,
    shard_optimizer=True,
)

# key -> (kind, help). Kinds: path, str, int, float, ints (a list of ints), bool (a switch).
FLAGS = {
    "data_dir": ("path", "folder holding cifar-10-batches-py, or that folder itself (default: $DPNET_DATA_DIR, "
                         "else ~/.cache/dpnet/data, where CIFAR-10 is downloaded on first use)"),
    "download": ("bool", "download CIFAR-10 into --data-dir / $DPNET_DATA_DIR if it is missing there"),
    "num_train": ("int", "training images to use (the first N of the 49000; the next 1000 are the validation set)"),
    "hidden_dims": ("ints", "sizes of the hidden layers, e.g. --hidden-dims 512 512 (none: a linear classifier)"),
    "activation": ("str", "activation after each hidden layer (built-in: relu; plugins add more)"),
    "normalization": ("str", "normalization after each hidden affine layer: batchnorm, layernorm or none"),
    "dropout": ("float", "probability of KEEPING a hidden unit (1: no dropout)"),
    "reg": ("float", "L2 regularization strength (0.5 * reg * sum of squared weights)"),
    "weight_scale": ("float", "standard deviation of the initial weights"),
    "loss": ("str", "loss function: softmax or svm"),
    "update_rule": ("str", "update rule: sgd, sgd_momentum, rmsprop or adam (plugins add more)"),
    "lr": ("float", "initial learning rate"),
    "lr_decay": ("float", "learning-rate factor: after every epoch (exponential), or at each milestone (step)"),
    "lr_schedule": ("str", "learning-rate schedule: exponential (times --lr-decay every epoch), step (times "
                           "--lr-decay at each of --lr-milestones) or cosine (down to 0 at the last epoch)"),
    "lr_milestones": ("ints", "epochs after which the step schedule multiplies the learning rate by --lr-decay"),
    "warmup_epochs": ("float", "linear learning-rate warm-up over this many epochs (any schedule)"),
    "weight_decay": ("float", "decoupled weight decay: weights shrink by lr * weight_decay every step"),
    "label_smoothing": ("float", "label smoothing of the softmax loss: the target puts this mass on all classes"),
    "augment": ("bool", "augment training images: random crops with --crop-padding and horizontal flips"),
    "crop_padding": ("int", "padding in pixels of the random crops of --augment"),
    "batch_size": ("int", "global minibatch size, split across the processes"),
    "epochs": ("int", "number of passes over the training images (with --resume: the total, to train longer)"),
    "dtype": ("str", "floating-point type of the parameters and computations: float32 or float64"),
    "seed": ("int", "seed of the initialization, the minibatch order and the dropout masks"),
    "logdir": ("path", "folder of the TensorBoard events, configuration and plot (default: "
                       "runs/<timestamp>-<short config>, with --resume the resumed run's)"),
    "checkpoint_dir": ("path", "folder of last.npz and best.npz (default: the logdir)"),
    "checkpoint_every": ("int", "write last.npz every this many epochs (always at the end; 0: only then)"),
    "resume": ("path", "continue the run saved in this checkpoint, e.g. runs/<run>/last.npz (default: a new run)"),
    "quiet": ("bool", "print only errors and the final result (no progress bar, no per-epoch lines)"),
    "blas_threads": ("int", "BLAS threads per process (default: $DPNET_BLAS_THREADS, else the cores divided among "
                            "the processes on this machine)"),
    "shard_optimizer": ("bool", "with several processes, each keeps the update rule's state of its block of the "
                                "parameters only, when the rule is elementwise, as the built-in ones are (the same "
                                "results, less memory)"),
}
# What a resumed run may change; everything else shapes the model, the data or the optimization and must match.
RESUME_MAY_CHANGE = {"data_dir", "download", "epochs", "logdir", "checkpoint_dir", "checkpoint_every", "resume",
                     "quiet", "blas_threads", "shard_optimizer"}
# Where the run is, not what it is: left out of config.toml and of the hyper-parameters.
_LOCATION_KEYS = ("data_dir", "download", "logdir", "checkpoint_dir", "resume", "quiet", "blas_threads",
                  "shard_optimizer")
DTYPES = ("float32", "float64")
SCHEDULES = ("exponential", "step", "cosine")
NUM_VALIDATION = 1000
NUM_TRAIN_MAX = 50000 - NUM_VALIDATION
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class UsageError(Exception):
    """Bad input: the run ends with this message and exit code 2 before training starts."""


def flag(key):
    return "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """argparse that speaks on rank 0 only, so that N processes print one message."""

    rank = 0

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)


def _shown(value):
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


_METAVARS = {"dtype": "{float32,float64}", "resume": "CHECKPOINT", "dropout": "P", "lr_decay": "FACTOR",
             "weight_scale": "STD", "reg": "STRENGTH", "config": "FILE"}


def build_parser(rank=0):
    parser = _Parser(prog="dpnet-train", argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Train a FullyConnectedNet on CIFAR-10, in one process or data parallel under\n"
                                 "`mpiexec -n N`, with TensorBoard logs, progress, checkpoints and exact resume.",
                     epilog="Exit codes: 0 done, 2 bad input, 3 the loss became NaN or inf, 130 interrupted.\n"
                            "TensorBoard: pip install tensorboard; tensorboard --logdir runs")
    parser.rank = rank
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys are these flags (hidden-dims = "
                                                         "[512, 512], ...); flags given here override it")
    for key, (kind, text) in FLAGS.items():
        default = DEFAULTS[key]
        shown = "off" if default is False else _shown(default)
        help_text = text if default is None else f"{text} (default: {shown})"  # None: the text says it
        if kind == "bool":
            parser.add_argument(flag(key), action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "ints":
            parser.add_argument(flag(key), nargs="*", type=int, metavar="N", help=help_text)
        else:
            types = {"int": int, "float": float, "str": str, "path": str}
            choices = DTYPES if key == "dtype" else None
            metavar = _METAVARS.get(key, {"int": "N", "path": "DIR", "str": "NAME"}.get(kind, key.upper()))
            parser.add_argument(flag(key), type=types[kind], choices=choices, metavar=metavar, help=help_text)
    return parser


def _typed(key, value, source):
    """value (from a TOML file) checked against the kind of `key`; UsageError otherwise."""
    kind = FLAGS[key][0]
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str), "path": lambda v: isinstance(v, str),
          "ints": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}
    if value is None and DEFAULTS[key] is None:
        return None
    if not ok[kind](value):
        wanted = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                  "path": "a string", "ints": "a list of integers"}[kind]
        raise UsageError(f"{source}: {key.replace('_', '-')} must be {wanted}, got {value!r}")
    return float(value) if kind == "float" else value


def load_toml(path):
    """The configuration in a TOML file as {key: value}; UsageError for a missing or malformed file, unknown keys or
    values of the wrong type."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    config = {}
    unknown = []
    for name, value in raw.items():
        key = name.replace("-", "_")
        if key not in FLAGS:
            unknown.append(name)
        else:
            config[key] = _typed(key, value, path)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are the flag names: "
                         f"{', '.join(k.replace('_', '-') for k in FLAGS)}")
    return config


def resolve_config(given):
    """The run's configuration, and the meta of the checkpoint to resume (None: a new run), from the flags given.

    Precedence: DEFAULTS < the resumed checkpoint's configuration < the --config file < the flags.
    """
    given = dict(given)
    from_file = load_toml(given.pop("config")) if "config" in given else {}
    explicit = {**from_file, **given}
    saved, meta = {}, None
    resume = explicit.get("resume")
    if resume:
        from .checkpoint import CheckpointError, load_checkpoint

        try:
            _, meta = load_checkpoint(resume)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
        saved = {k: v for k, v in meta.get("config", {}).items() if k in FLAGS}
        differ = [f"{flag(k)} {_shown(v)} (the checkpoint has {_shown(saved[k])})"
                  for k, v in sorted(explicit.items())
                  if k not in RESUME_MAY_CHANGE and k in saved and v != saved[k]]
        if differ:
            raise UsageError(f"cannot resume {resume} with a different configuration: {'; '.join(differ)}. A resumed "
                             f"run continues the saved one; only {', '.join(sorted(map(flag, RESUME_MAY_CHANGE)))} "
                             f"may change (start a new run to change the rest)")
    return {**DEFAULTS, **saved, **explicit}, meta


def check_config(config, num_processes):
    """Raise UsageError naming the flag for the first invalid value."""
    from . import registry

    def need(condition, key, what):
        if not condition:
            raise UsageError(f"{flag(key)} must be {what}, got {_shown(config[key])}")

    for key in (k for k, (kind, _) in FLAGS.items() if kind == "float"):
        need(np.isfinite(config[key]), key, "a finite number")
    need(1 <= config["num_train"] <= NUM_TRAIN_MAX, "num_train", f"between 1 and {NUM_TRAIN_MAX}")
    need(all(h >= 1 for h in config["hidden_dims"]), "hidden_dims", "positive integers")
    need(0 < config["dropout"] <= 1, "dropout", "a keep probability in (0, 1]")
    need(config["reg"] >= 0, "reg", ">= 0")
    need(config["weight_scale"] > 0, "weight_scale", "> 0")
    need(config["lr"] > 0, "lr", "> 0")
    need(config["lr_decay"] > 0, "lr_decay", "> 0")
    need(config["lr_schedule"] in SCHEDULES, "lr_schedule", f"one of {', '.join(SCHEDULES)}")
    need(all(m >= 1 for m in config["lr_milestones"]), "lr_milestones", "positive epoch numbers")
    need(config["warmup_epochs"] >= 0, "warmup_epochs", ">= 0")
    need(config["weight_decay"] >= 0, "weight_decay", ">= 0")
    need(0 <= config["label_smoothing"] < 1, "label_smoothing", "in [0, 1)")
    need(config["crop_padding"] >= 0, "crop_padding", ">= 0")
    need(config["batch_size"] >= 1, "batch_size", "a positive integer")
    need(config["epochs"] >= 1, "epochs", "a positive integer")
    need(config["checkpoint_every"] >= 0, "checkpoint_every", ">= 0")
    need(config["dtype"] in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
    need(config["seed"] >= 0, "seed", ">= 0")
    need(config["blas_threads"] is None or config["blas_threads"] >= 1, "blas_threads", "a positive integer")
    smallest = min(config["batch_size"], config["num_train"])
    if smallest < num_processes:
        what = "--batch-size" if config["batch_size"] <= config["num_train"] else "--num-train"
        raise UsageError(f"the global batch ({what} {smallest}) is smaller than the number of processes "
                         f"({num_processes}): every process needs at least one image per step")
    try:
        for key, kind in (("activation", "activation"), ("normalization", "normalization"), ("loss", "loss"),
                          ("update_rule", "update_rule")):
            names = registry.available(kind)
            if config[key] not in names and not (key == "normalization" and config[key] == "none"):
                extra = ["none"] if key == "normalization" else []
                raise UsageError(f"unknown {flag(key)} {config[key]!r}; the choices are: "
                                 f"{', '.join(extra + list(names))} (`python -m dpnet.plugins` lists the providers)")
    except registry.PluginError as exc:
        raise UsageError(f"a plugin is broken: {exc}") from None
    need(config["label_smoothing"] == 0 or config["loss"] == "softmax", "label_smoothing",
         "0 with a loss other than softmax")


def short_name(config):
    hidden = "x".join(map(str, config["hidden_dims"])) or "linear"
    return (f"fc{hidden}-{config['normalization']}-{config['update_rule']}-lr{config['lr']:g}"
            f"-bs{config['batch_size']}")


def _check_writable(path, what):
    """UsageError unless `path` is, or can be created as, a folder this process can write; nothing is created."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"the {what} {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"the {what} {path} cannot be written: no write permission on {existing}")
    return str(path)


def make_dir(path, what):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"the {what} {path} cannot be written: {exc.strerror or exc}") from None


_WHAT = {"logdir": "log directory (--logdir)", "checkpoint_dir": "checkpoint directory (--checkpoint-dir)"}


def resolve_dirs(config):
    """Resolve the log and checkpoint folders (rank 0) and check they can be written, creating nothing."""
    logdir = config["logdir"]
    if logdir is None:
        base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_name(config)}"
        logdir, n = base, 1
        while logdir.exists():
            n += 1
            logdir = base.with_name(f"{base.name}-{n}")
    config["logdir"] = _check_writable(logdir, _WHAT["logdir"])
    config["checkpoint_dir"] = _check_writable(config["checkpoint_dir"] or config["logdir"], _WHAT["checkpoint_dir"])


def to_toml(config):
    """The configuration as a TOML document that --config reads back (locations left out)."""
    lines = []
    for key in FLAGS:
        if key in _LOCATION_KEYS:
            continue
        value = config[key]
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- collective checks
def agree(comm, step):
    """Run step() on every process; if it raises UsageError on any, all exit with code 2 and the first failing rank
    prints its message (one message, however many processes)."""
    try:
        result, error = step(), None
    except UsageError as exc:
        result, error = None, str(exc)
    failed = np.zeros(comm.size, dtype=np.int64)
    failed[comm.rank] = error is not None
    comm.allreduce(failed)
    if failed.any():
        if comm.rank == int(np.argmax(failed)):
            print(f"dpnet-train: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    return result


def _data_error(exc):
    return UsageError(f"cannot load CIFAR-10: {exc}")


def locate_data(config, rank, quiet):
    """The CIFAR-10 folder. It is downloaded (by rank 0, the others wait) only into the default location, or with
    --download."""
    from . import data_utils

    download = config["download"] or (config["data_dir"] is None and not os.environ.get(data_utils.DATA_DIR_ENV))
    if rank == 0 and download and not quiet:
        try:
            data_utils.find_data_dir(config["data_dir"])
        except data_utils.CIFAR10NotFoundError:
            print("dpnet-train: CIFAR-10 is missing; downloading it (about 170 MB, once)", flush=True)
    try:
        found = data_utils.locate_CIFAR10(config["data_dir"], download=download, progress=False if quiet else None)
    except data_utils.CIFAR10NotFoundError as exc:
        if exc.incomplete is not None:
            missing = [n for n in data_utils.REQUIRED_FILES if not (exc.incomplete / n).is_file()]
            raise UsageError(f"CIFAR-10 in {exc.incomplete} is incomplete: {', '.join(missing)} missing (remove the "
                             "folder to download it again)") from None
        where = (f"--data-dir {config['data_dir']}" if config["data_dir"] is not None
                 else f"${data_utils.DATA_DIR_ENV}={os.environ.get(data_utils.DATA_DIR_ENV)}")
        raise UsageError(f"CIFAR-10 not found in {where} (looked for data_batch_1..5 and test_batch there and in its "
                         f"{data_utils.CIFAR10_FOLDER} folder): pass --download to download it there, or point "
                         f"--data-dir at the folder holding {data_utils.CIFAR10_FOLDER}") from None
    except (OSError, ValueError) as exc:
        raise _data_error(exc) from None
    return str(found)


def load_data(folder, config):
    from .data_utils import get_CIFAR10_data

    try:
        return get_CIFAR10_data(num_training=config["num_train"], num_validation=NUM_VALIDATION, num_test=10000,
                                data_dir=folder, dtype=np.dtype(config["dtype"]), lazy=True, download=False)
    except (OSError, ValueError) as exc:
        raise _data_error(exc) from None


def build_model(config):
    from .classifiers.fc_net import FullyConnectedNet

    norm = None if config["normalization"] == "none" else config["normalization"]
    return FullyConnectedNet(config["hidden_dims"], dropout=config["dropout"], normalization=norm, reg=config["reg"],
                             weight_scale=config["weight_scale"], dtype=np.dtype(config["dtype"]),
                             seed=config["seed"], activation=config["activation"], loss=config["loss"],
                             label_smoothing=config["label_smoothing"])


def make_lr_schedule(config):
    """The learning-rate schedule of the configuration: a factor per iteration (see dpnet.schedules)."""
    from .schedules import make_schedule

    per_epoch = max(config["num_train"] // config["batch_size"], 1)
    return make_schedule(config["lr_schedule"], total_iterations=config["epochs"] * per_epoch,
                         warmup_iterations=round(config["warmup_epochs"] * per_epoch), decay=config["lr_decay"],
                         milestones=[m * per_epoch for m in config["lr_milestones"]], iterations_per_epoch=per_epoch)


def hyperparameters(config, num_processes):
    hp = {k: (_shown(v) if isinstance(v, list) or v is None else v)
          for k, v in config.items() if k not in _LOCATION_KEYS}
    hp["processes"] = num_processes
    return hp


# ----------------------------------------------------------------------------------------------- the run
def _stop_diverged(comm, solver, exc, last):
    message = str(exc)
    if "iteration" not in message:
        message += f" (after iteration {solver.iteration})"
    kept = f"; the last good checkpoint is {last}" if last and os.path.exists(last) else ""
    text = f"dpnet-train: error: training diverged: {message}{kept}"
    if comm.size == 1:
        print(text, file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    # Another rank may be waiting in a collective: end the job. Rank 0 speaks first; the others only if rank 0 did
    # not end the job within a moment (it failed elsewhere or not at all).
    if comm.rank != 0:
        time.sleep(2.0)
    print(f"{text} (rank {comm.rank})" if comm.rank else text, file=sys.stderr, flush=True)
    comm.abort(EXIT_DIVERGED)


def _final_report(comm, solver, config, test_acc, final_acc, tensorboard, seconds):
    from .monitor import save_curves

    iteration = solver.iteration
    metrics = {"hparam/test_accuracy": float(test_acc), "hparam/final_test_accuracy": float(final_acc),
               "hparam/best_val_accuracy": float(solver.best_val_acc)}
    if solver.loss_history:
        metrics["hparam/final_loss"] = float(solver.loss_history[-1])
    tensorboard.write_hparams(hyperparameters(config, comm.size), metrics, iteration)
    plot = os.path.join(config["logdir"], "curves.png")
    try:
        save_curves(plot, solver.loss_history, solver.train_acc_history, solver.val_acc_history)
    except ImportError:
        plot = None
        print("dpnet-train: no plot: matplotlib is not installed (pip install 'dpnet[plot]' to get curves.png)",
              flush=True)
    minutes, secs = divmod(seconds, 60)
    print(f"test accuracy {test_acc:.4f} (best validation accuracy {solver.best_val_acc:.4f}; final parameters "
          f"{final_acc:.4f}; {solver.epoch} "
          f"epoch{'s' * (solver.epoch != 1)}, {int(minutes)}m{secs:04.1f}s on {comm.size} "
          f"process{'es' * (comm.size > 1)})", flush=True)
    if not config["quiet"]:
        ckdir = config["checkpoint_dir"]
        print(f"logs: {config['logdir']}" + (f"  plot: {plot}" if plot else ""))
        print(f"checkpoints: {os.path.join(ckdir, 'last.npz')} (last state), {os.path.join(ckdir, 'best.npz')} "
              f"(best validation accuracy)")
        print(f"view: tensorboard --logdir {config['logdir']}", flush=True)


def setup(comm, argv):
    """Everything before training, checked on every process: (config, the resumed checkpoint's meta or None, data,
    model). Bad input ends all processes with exit code 2 (see agree)."""
    given = vars(build_parser(comm.rank).parse_args(argv))

    def configure():
        config, meta = resolve_config(given)
        check_config(config, comm.size)
        if comm.rank == 0:
            resolve_dirs(config)
        return config, meta

    config, meta = agree(comm, configure)
    from .distributed import set_blas_threads

    config["blas_threads"] = set_blas_threads(config["blas_threads"], comm=comm)
    folder = agree(comm, lambda: locate_data(config, comm.rank, config["quiet"]) if comm.rank == 0 else None)
    folder = agree(comm, lambda: locate_data(config, comm.rank, True) if comm.rank else folder)
    data = agree(comm, lambda: load_data(folder, config))
    model = agree(comm, lambda: build_model(config))
    # The folders are created only now that the input is known to be good.
    agree(comm, lambda: [make_dir(config[key], what) for key, what in _WHAT.items()] if comm.rank == 0 else None)
    return config, meta, data, model


def make_solver(comm, config, meta, data, model):
    """The Solver with its monitors (rank 0), restored from config['resume'] if given: (solver, tensorboard monitor,
    checkpoint monitor); the monitors are None on other ranks."""
    from .checkpoint import CheckpointError, restore_checkpoint
    from .augment import Augmentation
    from .monitor import CheckpointMonitor, ProgressMonitor, TensorBoardMonitor
    from .registry import get_update_rule
    from .sharding import is_shardable
    from .solver import Solver

    monitors, tensorboard, checkpoints = [], None, None
    if comm.rank == 0:
        saved = {k: v for k, v in config.items() if k not in ("resume", "blas_threads")}  # what a resume reuses
        checkpoints = CheckpointMonitor(config["checkpoint_dir"], config["checkpoint_every"], saved)
        tensorboard = TensorBoardMonitor(config["logdir"], "```toml\n" + to_toml(config) + "```")
        # TensorBoard before the checkpoints: the events of a checkpointed epoch are on disk.
        monitors = [ProgressMonitor(quiet=config["quiet"]), tensorboard, checkpoints]
    shard = config["shard_optimizer"] and is_shardable(get_update_rule(config["update_rule"]))
    solver = Solver(model, data, update_rule=config["update_rule"], optim_config={"learning_rate": config["lr"]},
                    batch_size=config["batch_size"], num_epochs=config["epochs"], num_train_samples=1000,
                    num_val_samples=None, verbose=False, seed=config["seed"], comm=comm, monitors=monitors,
                    lr_schedule=make_lr_schedule(config), weight_decay=config["weight_decay"],
                    shard_optimizer=shard,
                    augment=Augmentation(crop_padding=config["crop_padding"]) if config["augment"] else None)

    def restore():
        try:
            restore_checkpoint(solver, config["resume"])
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None

    if meta is not None:
        agree(comm, restore)
        if tensorboard is not None:
            tensorboard.purge_step = solver.iteration + 1  # hide what the interrupted run logged after its checkpoint
    return solver, tensorboard, checkpoints


def _describe(comm, config, meta, solver):
    dims = "-".join(map(str, [solver.model.input_dim, *config["hidden_dims"], solver.model.num_classes]))
    threads = config["blas_threads"]
    lines = [f"dpnet-train: FullyConnectedNet {dims} ({config['normalization']}, {config['activation']}, dropout "
             f"keep {config['dropout']:g}, {config['dtype']}); {config['update_rule']} lr {config['lr']:g} decay "
             f"{config['lr_decay']:g}; {config['epochs']} epochs of {config['num_train']} images in batches of "
             f"{config['batch_size']}; {comm.size} process{'es' * (comm.size > 1)} x {threads} BLAS "
             f"thread{'s' * (threads > 1)}"]
    if comm.size > 1:
        lines.append("dpnet-train: update-rule state sharded over the processes" if solver.shard_optimizer else
                     "dpnet-train: update-rule state replicated on every process"
                     + (f" (the rule {config['update_rule']!r} does not declare itself elementwise)"
                        if config["shard_optimizer"] else ""))
    if meta is not None:
        lines.append(f"dpnet-train: resuming {config['resume']} at epoch {solver.epoch} (iteration "
                     f"{solver.iteration})")
        if meta.get("num_processes", comm.size) != comm.size:
            lines.append(f"dpnet-train: note: the checkpoint was written by {meta['num_processes']} processes; with "
                         f"{comm.size} the run continues, but not bit for bit as it would have")
    lines.append(f"dpnet-train: logs in {config['logdir']}")
    return "\n".join(lines)


def run(argv=None):
    """The whole command; returns the exit code (bad input raises SystemExit(2))."""
    from .distributed import get_communicator

    comm = get_communicator()
    config, meta, data, model = setup(comm, argv)
    solver, tensorboard, checkpoints = make_solver(comm, config, meta, data, model)
    if comm.rank == 0:
        Path(config["logdir"], "config.toml").write_text(to_toml(config))
        if not config["quiet"]:
            print(_describe(comm, config, meta, solver), flush=True)
    start = time.perf_counter()
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # divergence is detected and reported
            solver.train()
    except FloatingPointError as exc:
        return _stop_diverged(comm, solver, exc, checkpoints and checkpoints.last_path)
    except KeyboardInterrupt:
        last = checkpoints.last_path if checkpoints and os.path.exists(checkpoints.last_path) else None
        hint = f"; resume with: python -m dpnet.train --resume {last}" if last else ""
        print(f"\ndpnet-train: interrupted at iteration {solver.iteration}{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if tensorboard is not None:
            tensorboard.flush()
    test_acc = solver.check_accuracy(data["X_test"], data["y_test"])  # the best parameters, which train() loaded
    solver.use_params("final")
    final_acc = solver.check_accuracy(data["X_test"], data["y_test"])
    solver.use_params("best")
    if comm.rank == 0:
        try:
            _final_report(comm, solver, config, test_acc, final_acc, tensorboard, time.perf_counter() - start)
        finally:
            tensorboard.close()
    return 0


def main(argv=None):
    """Entry point of `python -m dpnet.train` and `dpnet-train`: returns the exit code (argparse and bad input raise
    SystemExit(2))."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("\ndpnet-train: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
