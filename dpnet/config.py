"""The command line's configuration: what a run's configuration is (DEFAULTS, FLAGS), where it comes from, and
whether it is valid.

Precedence: DEFAULTS < the configuration saved in the --resume checkpoint < the --config TOML file (its keys are the
flag names, with '-' or '_') < the flags given (resolve_config). A resumed run continues the saved configuration; only
the keys in RESUME_MAY_CHANGE may differ from it. Bad input raises UsageError. Nothing here creates files:
resolve_dirs only checks that the log and checkpoint folders can be written; dpnet.train creates them and runs.
"""

import argparse
import json
import os
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
    shared_memory=True,
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
    "shared_memory": ("bool", "with every process on one machine, sum the gradients in shared memory (/dev/shm) "
                              "instead of copying them through MPI, and with --shard-optimizer keep one copy of the "
                              "parameters there (faster, less memory; the sums are added in another order, so the "
                              "results agree to rounding: closely in float64, while float32 runs may drift apart)"),
}
# What a resumed run may change; everything else shapes the model, the data or the optimization and must match.
RESUME_MAY_CHANGE = {"data_dir", "download", "epochs", "logdir", "checkpoint_dir", "checkpoint_every", "resume",
                     "quiet", "blas_threads", "shard_optimizer", "shared_memory"}
# Where the run is, not what it is: left out of config.toml and of the hyper-parameters.
LOCATION_KEYS = ("data_dir", "download", "logdir", "checkpoint_dir", "resume", "quiet", "blas_threads",
                  "shard_optimizer", "shared_memory")
DTYPES = ("float32", "float64")
SCHEDULES = ("exponential", "step", "cosine")
NUM_VALIDATION = 1000
NUM_TRAIN_MAX = 50000 - NUM_VALIDATION


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


def shown(value):
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
        default_text = "off" if default is False else shown(default)
        help_text = text if default is None else f"{text} (default: {default_text})"  # None: the text says it
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
        differ = [f"{flag(k)} {shown(v)} (the checkpoint has {shown(saved[k])})"
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
            raise UsageError(f"{flag(key)} must be {what}, got {shown(config[key])}")

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


OUTPUT_DIRS = {"logdir": "log directory (--logdir)", "checkpoint_dir": "checkpoint directory (--checkpoint-dir)"}


def resolve_dirs(config):
    """Resolve the log and checkpoint folders (rank 0) and check they can be written, creating nothing."""
    logdir = config["logdir"]
    if logdir is None:
        base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_name(config)}"
        logdir, n = base, 1
        while logdir.exists():
            n += 1
            logdir = base.with_name(f"{base.name}-{n}")
    config["logdir"] = _check_writable(logdir, OUTPUT_DIRS["logdir"])
    config["checkpoint_dir"] = _check_writable(config["checkpoint_dir"] or config["logdir"],
                                               OUTPUT_DIRS["checkpoint_dir"])


def to_toml(config):
    """The configuration as a TOML document that --config reads back (locations left out)."""
    lines = []
    for key in FLAGS:
        if key in LOCATION_KEYS:
            continue
        value = config[key]
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"
