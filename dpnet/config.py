"""The command line's configuration: what a run's configuration is (DEFAULTS, FLAGS), its flags (build_parser), how
values are shown and written (shown, to_toml), and where the run writes (resolve_dirs).

Beside it: config_sources.py (resolve_config: defaults, a resumed checkpoint's configuration, the --config TOML and the
flags, in that precedence), config_checks.py (check_config), config_values.py (the text forms of values and layers).
Bad input raises UsageError. Nothing here creates files: resolve_dirs only checks that the log and checkpoint folders
can be written; dpnet.train creates them and runs.

The architecture is given one of three ways: the FullyConnectedNet keys (FC_KEYS: --hidden-dims, --activation,
--normalization, --dropout, --weight-scale), `layers` (a dpnet.models.Sequential spec), or `model` (a network a plugin
provides through the dpnet_models hook, with `model_options`). Giving two of them is an error; with `layers` or
`model` the FC_KEYS are None in the configuration. On the command line a `layers` spec has a compact form,
LAYERS_GRAMMAR (parse_layers, format_layers); in TOML it is an array of names and inline tables.
"""

import argparse
import difflib
import os
import time
from pathlib import Path

from .config_values import (LAYERS_EXAMPLE, LAYERS_GRAMMAR, VALUES_HELP, format_layers, format_value,  # noqa: F401 (re-exported)
                            layer_entries, parse_key_value, parse_layers, scalar_table, toml_key, toml_value)

# The tuned configuration of a bare `python -m dpnet.train`, mirrored in configs/default.toml (tests check the two
# agree). Change both together.
DEFAULTS = dict(
    data_dir=None,
    download=False,
    num_train=49000,
    layers=None,
    model=None,
    model_options={},
    hidden_dims=[1024, 512],
    activation="relu",
    normalization="batchnorm",
    dropout=1.0,
    reg=0.0,
    weight_scale=2e-2,
    loss="softmax",
    update_rule="sgd_momentum",
    lr=5e-2,
    optim={},
    lr_decay=0.95,
    lr_schedule="cosine",
    lr_milestones=[],
    warmup_epochs=2.0,
    weight_decay=5e-3,
    label_smoothing=0.1,
    augment=True,
    crop_padding=4,
    zca=0.1,
    mixup=0.0,
    cutmix=0.0,
    mix_probability=1.0,
    cutmix_probability=0.5,
    ema=0.999,
    ema_every=4,
    test_flips=True,
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
    timeout=None,
    force_blas_threads=False,
)

# key -> (kind, help). Kinds: path, str, int, float, ints (a list of ints), bool (a switch), layers (a Sequential
# spec), options (a table of KEY=VALUE, given by a repeatable flag).
FLAGS = {
    "data_dir": ("path", "folder holding cifar-10-batches-py, or that folder itself (default: $DPNET_DATA_DIR, "
                         "else ~/.cache/dpnet/data, where CIFAR-10 is downloaded on first use)"),
    "download": ("bool", "download CIFAR-10 into --data-dir / $DPNET_DATA_DIR if it is missing there"),
    "num_train": ("int", "training images to use (the first N of the 49000; the next 1000 are the validation set)"),
    "layers": ("layers", f"the network, layer by layer (a dpnet.models.Sequential, input (3, 32, 32)), instead of "
                         f"the FullyConnectedNet of --hidden-dims, --activation, --normalization, --dropout and "
                         f"--weight-scale: {LAYERS_GRAMMAR}, e.g. --layers {LAYERS_EXAMPLE}; the entries may also be "
                         f"separate arguments. NAME is any layer of `python -m dpnet.plugins` (kind layer, activation "
                         f"or normalization), KEY=VALUE its options; {VALUES_HELP}. In TOML: layers = [{{layer = "
                         f"\"affine\", units = 1024}}, \"relu\", ...]"),
    "model": ("str", "a network that a plugin provides (its dpnet_models hook), instead of --layers or the "
                     "FullyConnectedNet flags; built with the --model-option options (`python -m dpnet.plugins` lists "
                     "the models)"),
    "model_options": ("options", f"an option of --model, KEY=VALUE (repeatable; {VALUES_HELP}); in TOML the table "
                                 f"[model-options]"),
    "hidden_dims": ("ints", "sizes of the hidden layers, e.g. --hidden-dims 512 512 (none: a linear classifier)"),
    "activation": ("str", "activation after each hidden layer (built-in: relu; plugins add more)"),
    "normalization": ("str", "normalization after each hidden affine layer: batchnorm, layernorm or none"),
    "dropout": ("float", "probability of KEEPING a hidden unit (1: no dropout)"),
    "reg": ("float", "L2 regularization strength (0.5 * reg * sum of squared weights)"),
    "weight_scale": ("float", "standard deviation of the initial weights"),
    "loss": ("str", "loss function: softmax or svm"),
    "update_rule": ("str", "update rule: sgd, sgd_momentum, rmsprop or adam (plugins add more)"),
    "lr": ("float", "initial learning rate"),
    "optim": ("options", f"a hyper-parameter of the update rule, KEY=VALUE, e.g. --optim beta2=0.99 (repeatable; "
                         f"{VALUES_HELP}; the learning rate is --lr); in TOML the table [optim]. The keys are "
                         f"those the rule fills in by default"),
    "lr_decay": ("float", "learning-rate factor: after every epoch (exponential), or at each milestone (step)"),
    "lr_schedule": ("str", "learning-rate schedule: exponential (times --lr-decay every epoch), step (times "
                           "--lr-decay at each of --lr-milestones) or cosine (down to 0 at the last epoch)"),
    "lr_milestones": ("ints", "epochs after which the step schedule multiplies the learning rate by --lr-decay"),
    "warmup_epochs": ("float", "linear learning-rate warm-up over this many epochs (any schedule)"),
    "weight_decay": ("float", "decoupled weight decay: weights shrink by lr * weight_decay every step"),
    "label_smoothing": ("float", "label smoothing of the softmax loss: the target puts this mass on all classes"),
    "augment": ("bool", "augment training images: random crops with --crop-padding and horizontal flips"),
    "crop_padding": ("int", "padding in pixels of the random crops of --augment"),
    "zca": ("float", "ZCA-whiten the images (decorrelate their pixels) with this epsilon, in units of (pixel / 255)^2, "
                     "e.g. 0.01 (0: off): the matrix is computed from the training images once and kept in the data "
                     "cache; checkpoints keep it, so that evaluate, predict and export feed the model alike"),
    "mixup": ("float", "MixUp: each training image is blended with a partner from its batch, lam * image + "
                       "(1 - lam) * partner with lam ~ Beta(ALPHA, ALPHA), and its label alike (soft targets; softmax "
                       "loss); 0: off"),
    "cutmix": ("float", "CutMix: a box of a partner image from the batch is pasted into each training image, covering "
                        "1 - lam of it with lam ~ Beta(ALPHA, ALPHA), the labels mixed by the area (softmax loss); "
                        "0: off"),
    "mix_probability": ("float", "the probability that a batch is mixed by --mixup or --cutmix"),
    "cutmix_probability": ("float", "with both --mixup and --cutmix, the probability that a mixed batch takes CutMix "
                                    "(else MixUp)"),
    "ema": ("float", "keep an exponential moving average of the parameters with this decay (e.g. 0.999; 0: off), "
                     "scored on the validation set beside them at each evaluation: the best of both is kept (the test "
                     "accuracy is the best one's)"),
    "ema_every": ("int", "fold the parameters into the --ema average every N steps only (with decay**N), for 1/N of "
                         "its cost"),
    "test_flips": ("bool", "score every validation and test image as the average of the network's scores of it and of "
                           "its left-right mirror (the best parameters are chosen, and the test accuracy printed, by "
                           "these scores; the checkpoints record it, so evaluate, predict and export score alike)"),
    "batch_size": ("int", "global minibatch size, split across the processes"),
    "epochs": ("int", "number of passes over the training images (with --resume: the total, to train longer)"),
    "dtype": ("str", "floating-point type of the parameters and computations: float32 or float64"),
    "seed": ("int", "seed of the initialization, the minibatch order and the dropout masks"),
    "logdir": ("path", "folder of the TensorBoard events, configuration and plot (default: "
                       "runs/<timestamp>-<short config>; with --resume the folder of the checkpoint resumed). A "
                       "folder holding another run's checkpoints or events is refused"),
    "checkpoint_dir": ("path", "folder of last.npz and best.npz (default: the logdir)"),
    "checkpoint_every": ("int", "write last.npz every this many epochs (always at the end; 0: only then)"),
    "resume": ("path", "continue the run saved in this checkpoint, e.g. runs/<run>/last.npz (default: a new run)"),
    "quiet": ("bool", "print only errors and the final result (no progress bar, no per-epoch lines)"),
    "blas_threads": ("int", "BLAS threads per process (default: $DPNET_BLAS_THREADS, else the cores divided among "
                            "the processes on this machine)"),
    "shard_optimizer": ("bool", "with several processes, each keeps the update rule's state of its block of the "
                                "parameters only, when the rule is elementwise, as the built-in ones are (less "
                                "memory; the update's arithmetic is unchanged: results differ only as the gradients' "
                                "sums do, see --shared-memory)"),
    "shared_memory": ("bool", "with every process on one machine, sum the gradients in shared memory (/dev/shm) "
                              "instead of copying them through MPI, and with --shard-optimizer keep one copy of the "
                              "parameters there (faster, less memory). The sums are added in another order than "
                              "MPI's or one process's, so results are not bit for bit the same: in float64 they agree "
                              "to rounding, while float32 runs follow visibly different trajectories and end at "
                              "different accuracies"),
    "timeout": ("float", "with several processes, end the whole job (exit code 124) when one process has waited more "
                         "than this many seconds in a collective for another, naming the late process (a stopped or "
                         "hung one); longer than any step, evaluation or checkpoint write (default: no timeout)"),
    "force_blas_threads": ("bool", "accept more BLAS threads (--blas-threads, $DPNET_BLAS_THREADS, ...) than the "
                                   "cores this process may use"),
}
# What a resumed run may change; everything else shapes the model, the data or the optimization and must match.
RESUME_MAY_CHANGE = {"data_dir", "download", "epochs", "logdir", "checkpoint_dir", "checkpoint_every", "resume",
                     "quiet", "blas_threads", "shard_optimizer", "shared_memory", "timeout", "force_blas_threads"}
# Where a run writes, and whether it downloads: from this invocation only, never from the checkpoint it resumes.
NOT_FROM_CHECKPOINT = ("logdir", "checkpoint_dir", "download", "resume")
# The FullyConnectedNet's architecture, which `layers` and `model` replace.
FC_KEYS = ("hidden_dims", "activation", "normalization", "dropout", "weight_scale")
# Keys whose value is a table, merged key by key across the sources.
TABLE_KEYS = ("model_options", "optim")
# What dpnet.train gives a --model factory (the keywords it takes of these) -> the flag that sets it.
MODEL_RUN_KEYS = {"input_dim": None, "loss": "loss", "reg": "reg", "label_smoothing": "label_smoothing",
                  "dtype": "dtype", "seed": "seed"}
# Where the run is, not what it is: left out of config.toml and of the hyper-parameters.
LOCATION_KEYS = ("data_dir", "download", "logdir", "checkpoint_dir", "resume", "quiet", "blas_threads",
                  "shard_optimizer", "shared_memory", "timeout", "force_blas_threads")
DTYPES = ("float32", "float64")
SCHEDULES = ("exponential", "step", "cosine")
NUM_VALIDATION = 1000
NUM_TRAIN_MAX = 50000 - NUM_VALIDATION


EXIT_BAD_INPUT = 2  # the exit code of every dpnet command given bad input


class UsageError(Exception):
    """Bad input: the run ends with this message and exit code 2 before training starts."""


def agree(comm, step, prog="dpnet-train"):
    """Run step() on every process; if it raises UsageError on any, the first failing rank prints its message as
    `prog: error: ...` and all exit with code 2 (one message, however many processes). Returns step()'s result."""
    import sys

    import numpy as np

    try:
        result, error = step(), None
    except UsageError as exc:
        result, error = None, str(exc)
    failed = np.zeros(comm.size, dtype=np.int64)
    failed[comm.rank] = error is not None
    comm.allreduce(failed)
    if failed.any():
        if comm.rank == int(np.argmax(failed)):
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    return result


def did_you_mean(value, choices):
    """"; did you mean 'x'?" naming the choices close to `value` (as the registry's errors do), else ""."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def flag(key):
    """The command-line flag of a configuration key."""
    return "--model-option" if key == "model_options" else "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------------------------- parsing
class Parser(argparse.ArgumentParser):
    """argparse that speaks on rank 0 only, so that N processes print one message."""

    rank = 0

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)

    def _check_value(self, action, value):
        """argparse's check of a choice, with "did you mean" added to its message."""
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices})"
                                                 f"{did_you_mean(value, action.choices)}")
        super()._check_value(action, value)


def shown(value):
    """A configuration value as the command line spells it (lists of layers in the compact form, tables as
    KEY=VALUE ...)."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return " ".join(f"{key}={format_value(item)}" for key, item in value.items()) or "(none)"
    if isinstance(value, list):
        if any(isinstance(item, (str, dict)) for item in value):
            return format_layers(value)
        return " ".join(map(str, value)) or "(none)"
    return str(value)


class _LayersArgument(argparse.Action):
    """--layers: every argument parsed with parse_layers, the entries joined (given again, the flag replaces)."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = []
        for text in values:
            try:
                entries.extend(parse_layers(text))
            except ValueError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, entries)


class _KeyValueArgument(argparse.Action):
    """A repeatable KEY=VALUE flag collected into a dict (a key given again: the last value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            key, value = parse_key_value(values)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        table = dict(getattr(namespace, self.dest, None) or {})
        table[key] = value
        setattr(namespace, self.dest, table)


_METAVARS = {"dtype": "{float32,float64}", "resume": "CHECKPOINT", "dropout": "P", "lr_decay": "FACTOR",
             "weight_scale": "STD", "reg": "STRENGTH", "config": "FILE", "timeout": "SECONDS", "zca": "EPS",
             "mixup": "ALPHA", "cutmix": "ALPHA", "mix_probability": "P", "cutmix_probability": "P", "ema": "DECAY"}


def build_parser(rank=0):
    parser = Parser(prog="dpnet-train", argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Train a network on CIFAR-10 (a FullyConnectedNet, the layers of --layers, or a\n"
                                 "plugin's --model), in one process or data parallel under `mpiexec -n N`, with\n"
                                 "TensorBoard logs, progress, checkpoints and exact resume.",
                     epilog="Exit codes: 0 done, 2 bad input, 3 the loss became NaN or inf, 130 interrupted.\n"
                            "TensorBoard: pip install tensorboard; tensorboard --logdir runs")
    parser.rank = rank
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys are these flags (hidden-dims = "
                                                         "[512, 512], ...); flags given here override it")
    for key, (kind, text) in FLAGS.items():
        default = DEFAULTS[key]
        default_text = "off" if default is False else shown(default)
        help_text = text if default is None or default == {} else f"{text} (default: {default_text})"
        if kind == "bool":
            parser.add_argument(flag(key), action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == "layers":
            parser.add_argument(flag(key), nargs="+", action=_LayersArgument, metavar="SPEC", help=help_text)
        elif kind == "options":
            parser.add_argument(flag(key), action=_KeyValueArgument, metavar="KEY=VALUE", help=help_text,
                                dest=key)
        elif kind == "ints":
            parser.add_argument(flag(key), nargs="*", type=int, metavar="N", help=help_text)
        else:
            types = {"int": int, "float": float, "str": str, "path": str}
            choices = DTYPES if key == "dtype" else None
            metavar = _METAVARS.get(key, {"int": "N", "path": "DIR", "str": "NAME"}.get(kind, key.upper()))
            parser.add_argument(flag(key), type=types[kind], choices=choices, metavar=metavar, help=help_text)
    return parser


def short_name(config):
    if config["model"] is not None:
        network = f"model-{config['model']}"
    elif config["layers"] is not None:
        network = f"seq{len(config['layers'])}"
    else:
        hidden = "x".join(map(str, config["hidden_dims"])) or "linear"
        network = f"fc{hidden}-{config['normalization']}"
    return f"{network}-{config['update_rule']}-lr{config['lr']:g}-bs{config['batch_size']}"


def _check_writable(path, what):
    """UsageError unless `path` is, or can be created as, a folder this process can write; nothing is created."""
    from .run_checks import check_path

    check_path(Path(path).expanduser().absolute(), what)
    path = Path(path).expanduser().absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"the {what} {path} cannot be created: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"the {what} {path} cannot be written: no write permission on {existing}")
    except OSError as exc:
        raise UsageError(f"the {what} {path} cannot be used: {exc.strerror or exc}") from None
    return str(path)


OUTPUT_DIRS = {"logdir": "log directory (--logdir)", "checkpoint_dir": "checkpoint directory (--checkpoint-dir)"}


def resolve_dirs(config):
    """Resolve the log and checkpoint folders (rank 0) and check they can be written and hold no other run's
    checkpoints (dpnet.run_outputs.check_output_folders), creating nothing. Without --logdir a resumed run continues
    in the folder of the checkpoint it resumes, a new run in runs/<timestamp>-<short config>."""
    logdir = config["logdir"]
    if logdir is None and config["resume"]:
        logdir = Path(config["resume"]).expanduser().absolute().parent
    if logdir is None:
        base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_name(config)}"
        logdir, n = base, 1
        while logdir.exists():
            n += 1
            logdir = base.with_name(f"{base.name}-{n}")
    config["logdir"] = _check_writable(logdir, OUTPUT_DIRS["logdir"])
    config["checkpoint_dir"] = _check_writable(config["checkpoint_dir"] or config["logdir"],
                                               OUTPUT_DIRS["checkpoint_dir"])
    from .run_outputs import check_output_folders

    check_output_folders(config)


def to_toml(config):
    """The configuration as a TOML document that --config reads back (locations and unset keys left out; the tables
    optim and model_options as [optim] and [model-options] at the end)."""
    lines, tables = [], []
    for key in FLAGS:
        value = config[key]
        if key in LOCATION_KEYS or value is None:
            continue
        if key in TABLE_KEYS:
            if value:
                tables += ["", f"[{key.replace('_', '-')}]"] + [f"{toml_key(k)} = {toml_value(v)}"
                                                                 for k, v in value.items()]
            continue
        lines.append(f"{key.replace('_', '-')} = {toml_value(value)}")
    return "\n".join(lines + tables) + "\n"
