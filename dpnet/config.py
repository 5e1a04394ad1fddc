"""The command line's configuration: what a run's configuration is (DEFAULTS, FLAGS), where it comes from, and
whether it is valid.

Precedence: DEFAULTS < the configuration saved in the --resume checkpoint < the --config TOML file (its keys are the
flag names, with '-' or '_') < the flags given (resolve_config); the tables (optim, model_options) merge key by key.
A resumed run continues the saved configuration; only the keys in RESUME_MAY_CHANGE may differ from it. Bad input
raises UsageError. Nothing here creates files: resolve_dirs only checks that the log and checkpoint folders can be
written; dpnet.train creates them and runs.

The architecture is given one of three ways: the FullyConnectedNet keys (FC_KEYS: --hidden-dims, --activation,
--normalization, --dropout, --weight-scale), `layers` (a dpnet.models.Sequential spec), or `model` (a network a plugin
provides through the dpnet_models hook, with `model_options`). Giving two of them is an error; with `layers` or
`model` the FC_KEYS are None in the configuration. On the command line a `layers` spec has a compact form,
LAYERS_GRAMMAR (parse_layers, format_layers); in TOML it is an array of names and inline tables.
"""

import argparse
import difflib
import inspect
import json
import math
import os
import re
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

LAYERS_GRAMMAR = "NAME[:KEY=VALUE...][,NAME[:KEY=VALUE...]...]"
_LAYERS_EXAMPLE = "affine:units=1024,batchnorm,relu,dropout:keep=0.9,affine:units=10"
_VALUES = ("VALUE is true or false, an integer, a decimal number (0.5, 1e-3), a \"quoted string\" (JSON escapes) or "
           "any other word as a string")

# key -> (kind, help). Kinds: path, str, int, float, ints (a list of ints), bool (a switch), layers (a Sequential
# spec), options (a table of KEY=VALUE, given by a repeatable flag).
FLAGS = {
    "data_dir": ("path", "folder holding cifar-10-batches-py, or that folder itself (default: $DPNET_DATA_DIR, "
                         "else ~/.cache/dpnet/data, where CIFAR-10 is downloaded on first use)"),
    "download": ("bool", "download CIFAR-10 into --data-dir / $DPNET_DATA_DIR if it is missing there"),
    "num_train": ("int", "training images to use (the first N of the 49000; the next 1000 are the validation set)"),
    "layers": ("layers", f"the network, layer by layer (a dpnet.models.Sequential, input (3, 32, 32)), instead of "
                         f"the FullyConnectedNet of --hidden-dims, --activation, --normalization, --dropout and "
                         f"--weight-scale: {LAYERS_GRAMMAR}, e.g. --layers {_LAYERS_EXAMPLE}; the entries may also be "
                         f"separate arguments. NAME is any layer of `python -m dpnet.plugins` (kind layer, activation "
                         f"or normalization), KEY=VALUE its options; {_VALUES}. In TOML: layers = [{{layer = "
                         f"\"affine\", units = 1024}}, \"relu\", ...]"),
    "model": ("str", "a network that a plugin provides (its dpnet_models hook), instead of --layers or the "
                     "FullyConnectedNet flags; built with the --model-option options (`python -m dpnet.plugins` lists "
                     "the models)"),
    "model_options": ("options", f"an option of --model, KEY=VALUE (repeatable; {_VALUES}); in TOML the table "
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
                         f"{_VALUES}; the learning rate is --lr); in TOML the table [optim]. The keys are those the "
                         f"rule fills in by default"),
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


class UsageError(Exception):
    """Bad input: the run ends with this message and exit code 2 before training starts."""


def did_you_mean(value, choices):
    """"; did you mean 'x'?" naming the choices close to `value` (as the registry's errors do), else ""."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def flag(key):
    """The command-line flag of a configuration key."""
    return "--model-option" if key == "model_options" else "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------------------------- values and layers
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # a layer name (dpnet.plugins.records.VALID_NAME)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?\Z")
_WORD = re.compile(r"[^\s,:=\"]+")
_TOKENS = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|([,:=])|([^\s,:="]+)|(\S))')
_SCALARS = (bool, int, float, str)


def parse_value(text):
    """A KEY=VALUE value: true/false -> bool, an integer -> int, a decimal number -> float, a JSON-quoted string ->
    that string, any other word -> the word itself."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, str):
            raise ValueError(f"{text} is not a well-formed quoted string")
        return value
    return text


def format_value(value):
    """The text that parse_value reads back as `value` (a bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and _WORD.fullmatch(value) and parse_value(value) == value:
        return value
    return json.dumps(value)


def parse_key_value(text):
    """(key, value) of a KEY=VALUE argument (the value as parse_value reads it); ValueError saying what is wrong."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ValueError(f"expected KEY=VALUE with KEY a name (letters, digits, _), got {text!r}")
    if not value.strip():
        raise ValueError(f"{key}= has no value")
    return key, parse_value(value)


def parse_layers(text):
    """The layer list of a compact spec, LAYERS_GRAMMAR: entries separated by commas, each a layer name followed by
    ':KEY=VALUE' options (values as parse_value reads them). An entry without options is its name, one with options
    a dict {"layer": name, **options}. ValueError saying where the text is malformed."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKENS.match(text, pos)
        if match is None:  # only trailing white space is left
            break
        quoted, sep, word, other = match.groups()
        if other is not None:
            raise ValueError(f"malformed layer spec {text!r}: unexpected {other!r} at character {match.start(4) + 1} "
                             f"(the form is {LAYERS_GRAMMAR}, e.g. {_LAYERS_EXAMPLE})")
        start = match.start(match.lastindex)
        tokens.append((start, "word" if word is not None else "quoted" if quoted is not None else sep,
                       word or quoted or sep))
        pos = match.end()
    tokens.append((len(text), "end", ""))

    def fail(i, expected):
        at, kind, value = tokens[i]
        found = "the end" if kind == "end" else repr(value)
        raise ValueError(f"malformed layer spec {text!r}: expected {expected} at character {at + 1}, found {found} "
                         f"(the form is {LAYERS_GRAMMAR}, e.g. {_LAYERS_EXAMPLE})")

    entries, i = [], 0
    while True:
        if tokens[i][1] != "word" or not _NAME.match(tokens[i][2]):
            fail(i, "a layer name")
        entry, i = {"layer": tokens[i][2]}, i + 1
        while tokens[i][1] == ":":
            if tokens[i + 1][1] != "word" or not _KEY.match(tokens[i + 1][2]) or tokens[i + 1][2] == "layer":
                fail(i + 1, "an option name")
            if tokens[i + 2][1] != "=":
                fail(i + 2, f"'=' after the option {tokens[i + 1][2]}")
            if tokens[i + 3][1] not in ("word", "quoted"):
                fail(i + 3, f"a value for the option {tokens[i + 1][2]}")
            if tokens[i + 1][2] in entry:
                raise ValueError(f"malformed layer spec {text!r}: {entry['layer']} has the option "
                                 f"{tokens[i + 1][2]} twice (again at character {tokens[i + 1][0] + 1})")
            try:
                entry[tokens[i + 1][2]] = parse_value(tokens[i + 3][2])
            except ValueError as exc:
                raise ValueError(f"malformed layer spec {text!r}: {exc}") from None
            i += 4
        entries.append(entry["layer"] if len(entry) == 1 else entry)
        if tokens[i][1] == "end":
            return entries
        if tokens[i][1] != ",":
            fail(i, "',' or ':'")
        i += 1


def format_layers(spec):
    """The compact form (LAYERS_GRAMMAR) of a layer list, which parse_layers reads back as the same list."""
    parts = []
    for entry in spec:
        if isinstance(entry, dict):
            options = "".join(f":{key}={format_value(value)}" for key, value in entry.items() if key != "layer")
            parts.append(f"{entry['layer']}{options}")
        else:
            parts.append(str(entry))
    return ",".join(parts)


def _layer_entries(value, where):
    """A TOML `layers` value as a layer list: names, and dicts {"layer": name, **scalar options} (a table without
    options becomes its name); UsageError otherwise."""
    form = "an array of layer names and inline tables {layer = NAME, option = value, ...}"
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: layers must be {form}, got {value!r}")
    entries = []
    for i, entry in enumerate(value):
        name = entry.get("layer") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not _NAME.match(name):
            raise UsageError(f"{where}: layers[{i}] must be a layer name or an inline table with a layer name "
                             f"({form}), got {entry!r}")
        if isinstance(entry, dict):
            for key, option in entry.items():
                if not _KEY.match(key):
                    raise UsageError(f"{where}: layers[{i}] ({name}): {key!r} is not an option name")
                if not isinstance(option, _SCALARS):
                    raise UsageError(f"{where}: layers[{i}] ({name}): option {key} must be a boolean, number or "
                                     f"string, got {option!r}")
            entry = {"layer": name, **{k: v for k, v in entry.items() if k != "layer"}}
            entries.append(name if len(entry) == 1 else entry)
        else:
            entries.append(name)
    return entries


def _table(key, value, where):
    """A TOML table of KEY = scalar (optim, model_options) as a dict; UsageError otherwise."""
    toml_key = key.replace("_", "-")
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {toml_key} must be a table of key = value ([{toml_key}] with one key per "
                         f"line), got {value!r}")
    for name, item in value.items():
        if not _KEY.match(name):
            raise UsageError(f"{where}: [{toml_key}]: {name!r} is not a valid key")
        if not isinstance(item, _SCALARS):
            raise UsageError(f"{where}: [{toml_key}] {name} must be a boolean, number or string, got {item!r}")
    return dict(value)


# ----------------------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
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
             "weight_scale": "STD", "reg": "STRENGTH", "config": "FILE", "timeout": "SECONDS"}


def build_parser(rank=0):
    parser = _Parser(prog="dpnet-train", argument_default=argparse.SUPPRESS,
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


def _typed(key, value, source):
    """value (from a TOML file) checked against the kind of `key`; UsageError otherwise."""
    kind = FLAGS[key][0]
    if kind == "layers":
        return _layer_entries(value, source)
    if kind == "options":
        return _table(key, value, source)
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


TOML_LIMIT = 1 << 20  # bytes of a --config file (a configuration is a few hundred)


def load_toml(path):
    """The configuration in a TOML file as {key: value}; UsageError for a missing, malformed, non-UTF-8 or larger
    than TOML_LIMIT file (nothing beyond that is read), unknown keys or values of the wrong type."""
    try:
        with open(path, "rb") as f:
            data = f.read(TOML_LIMIT + 1)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > TOML_LIMIT:
        raise UsageError(f"the config file {path} is larger than {TOML_LIMIT >> 20} MiB: not a configuration")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start + 1}); TOML files are UTF-8") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc or 'nested too deeply'}") from None
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
    path = given.pop("config", None)
    from_file = load_toml(path) if path is not None else {}
    _check_one_architecture(from_file, given, path)
    explicit = {**from_file, **given}
    for key in TABLE_KEYS:
        if key in from_file and key in given:
            explicit[key] = {**from_file[key], **given[key]}
    saved, meta = {}, None
    resume = explicit.get("resume")
    if resume:
        saved, meta = _saved_config(resume, explicit)
        for key in TABLE_KEYS:
            if key in explicit and isinstance(saved.get(key), dict):
                explicit[key] = {**saved[key], **explicit[key]}
        differ = [f"{flag(k)} {shown(v)} (the checkpoint has {shown(saved[k])})"
                  for k, v in sorted(explicit.items())
                  if k not in RESUME_MAY_CHANGE and k in saved and v != saved[k]]
        if differ:
            raise UsageError(f"cannot resume {resume} with a different configuration: {'; '.join(differ)}. A resumed "
                             f"run continues the saved one; only {', '.join(sorted(map(flag, RESUME_MAY_CHANGE)))} "
                             f"may change (start a new run to change the rest)")
    config = {**DEFAULTS, **saved, **explicit}
    if config["layers"] is not None or config["model"] is not None:
        config.update(dict.fromkeys(FC_KEYS))  # not this run's architecture
    return config, meta


def _saved_config(resume, explicit):
    """(the configuration saved in the checkpoint `resume`, checked like a TOML file's; its meta), reading nothing but
    its meta. Where the run writes (NOT_FROM_CHECKPOINT) is left out: it comes from this invocation."""
    from .checkpoint import CheckpointError
    from .checkpoint_reader import read_meta

    try:
        meta = read_meta(resume)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    source = f"the configuration saved in {resume}"
    saved = {key: None if value is None and (key in FC_KEYS or DEFAULTS[key] is None) else _typed(key, value, source)
             for key, value in meta["config"].items() if key in FLAGS and key not in NOT_FROM_CHECKPOINT}
    if explicit.get("download") and "data_dir" not in explicit and saved.get("data_dir") is not None:
        raise UsageError(f"--download with --resume needs --data-dir: the data folder saved in {resume} is only read, "
                         "never downloaded into")
    return saved, meta


def _check_one_architecture(from_file, given, path):
    """UsageError when the flags and the --config file, together, give more than one of --model, --layers and the
    FullyConnectedNet keys (FC_KEYS)."""
    explicit = {**from_file, **given}

    def named(keys):
        return ", ".join(flag(k) + ("" if k in given else f" (in {path})") for k in keys)

    for key, what in (("model", "--model builds a plugin's network"),
                      ("layers", "--layers gives the network layer by layer")):
        if key in explicit:
            others = (["layers"] if key == "model" and "layers" in explicit else []) + [k for k in FC_KEYS
                                                                                          if k in explicit]
            if others:
                raise UsageError(f"{named([key])} cannot be combined with {named(others)}: {what}, in place of "
                                 f"{'--layers and ' if key == 'model' else ''}the FullyConnectedNet of "
                                 f"{', '.join(map(flag, FC_KEYS))}; give the architecture one way")


def check_config(config, num_processes):
    """Raise UsageError naming the flag for the first invalid value."""
    from . import registry

    def need(condition, key, what):
        if not condition:
            raise UsageError(f"{flag(key)} must be {what}, got {shown(config[key])}")

    for key in (k for k, (kind, _) in FLAGS.items() if kind == "float"):
        need(config[key] is None or np.isfinite(config[key]), key, "a finite number")
    need(1 <= config["num_train"] <= NUM_TRAIN_MAX, "num_train", f"between 1 and {NUM_TRAIN_MAX}")
    fc = config["layers"] is None and config["model"] is None
    if fc:
        need(all(h >= 1 for h in config["hidden_dims"]), "hidden_dims", "positive integers")
        need(0 < config["dropout"] <= 1, "dropout", "a keep probability in (0, 1]")
        need(config["weight_scale"] > 0, "weight_scale", "> 0")
    need(config["reg"] >= 0, "reg", ">= 0")
    need(config["lr"] > 0, "lr", "> 0")
    need(config["lr_decay"] > 0, "lr_decay", "> 0")
    for key, choices in (("lr_schedule", SCHEDULES), ("dtype", DTYPES)):
        if config[key] not in choices:
            raise UsageError(f"{flag(key)} must be one of {', '.join(choices)}, got {shown(config[key])}"
                             f"{did_you_mean(config[key], choices)}")
    need(all(m >= 1 for m in config["lr_milestones"]), "lr_milestones", "positive epoch numbers")
    need(config["warmup_epochs"] >= 0, "warmup_epochs", ">= 0")
    need(config["weight_decay"] >= 0, "weight_decay", ">= 0")
    need(0 <= config["label_smoothing"] < 1, "label_smoothing", "in [0, 1)")
    need(config["crop_padding"] >= 0, "crop_padding", ">= 0")
    need(config["batch_size"] >= 1, "batch_size", "a positive integer")
    need(config["epochs"] >= 1, "epochs", "a positive integer")
    need(config["checkpoint_every"] >= 0, "checkpoint_every", ">= 0")
    need(config["seed"] >= 0, "seed", ">= 0")
    need(config["blas_threads"] is None or config["blas_threads"] >= 1, "blas_threads", "a positive integer")
    from . import run_checks  # ranges the arithmetic needs; this machine's memory and cores

    run_checks.check_ranges(config)
    smallest = min(config["batch_size"], config["num_train"])
    if smallest < num_processes:
        what = "--batch-size" if config["batch_size"] <= config["num_train"] else "--num-train"
        raise UsageError(f"the global batch ({what} {smallest}) is smaller than the number of processes "
                         f"({num_processes}): every process needs at least one image per step")
    try:
        for key, kind in (("activation", "activation"), ("normalization", "normalization"), ("loss", "loss"),
                          ("update_rule", "update_rule")):
            names = registry.available(kind)
            if config[key] is None:  # not this run's architecture
                continue
            if config[key] not in names and not (key == "normalization" and config[key] == "none"):
                choices = (["none"] if key == "normalization" else []) + list(names)
                raise UsageError(f"unknown {flag(key)} {config[key]!r}; the choices are: {', '.join(choices)} "
                                 f"(`python -m dpnet.plugins` lists the providers){did_you_mean(config[key], choices)}")
        if config["layers"] is not None:
            _check_layer_names(config["layers"])
        if config["model"] is not None:
            _check_model(config)
        elif config["model_options"]:
            raise UsageError(f"--model-option {shown(config['model_options'])} needs --model (the options are a "
                             f"plugin model's; --layers takes its layers' options in the spec)")
        if config["optim"]:
            config["optim"] = optim_options(config["update_rule"], config["optim"])
    except registry.PluginError as exc:
        raise UsageError(f"a plugin is broken: {exc}") from None
    need(config["label_smoothing"] == 0 or config["loss"] == "softmax", "label_smoothing",
         "0 with a loss other than softmax")
    from .parallel.environment import processes_on_this_node

    run_checks.check_memory(config, processes_on_this_node())
    run_checks.check_blas_threads(config)


def _check_layer_names(spec):
    """UsageError for a layer name that no layer, activation or normalization has (with "did you mean")."""
    from .models import resolve

    for entry in spec:
        try:
            resolve(entry["layer"] if isinstance(entry, dict) else entry)
        except ValueError as exc:
            raise UsageError(f"--layers: {exc}") from None


def model_keywords(factory):
    """(the keyword names a model factory takes, whether it takes any keyword); (None, True) when its signature
    cannot be inspected."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _check_model(config):
    """UsageError for an unknown --model, a --model-option it does not take, or one that the run sets."""
    from . import registry

    name, options = config["model"], config["model_options"]
    models = registry.available("model")
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        choices = ", ".join(models) or "none (no installed plugin provides a model)"
        raise UsageError(f"unknown --model {name!r}{hint}; the choices are: {choices} (`python -m dpnet.plugins` "
                         f"lists the providers)")
    for key in options:
        if key in MODEL_RUN_KEYS:
            source = (f"use {flag(MODEL_RUN_KEYS[key])}" if MODEL_RUN_KEYS[key] else
                      "the CIFAR-10 images, (3, 32, 32)")
            raise UsageError(f"--model-option {key}: the run gives the model its {key} ({source})")
    names, any_keyword = model_keywords(registry.get_model(name))
    unknown = [key for key in options if not any_keyword and key not in names]
    if unknown:
        takes = [n for n in names if n not in MODEL_RUN_KEYS]
        raise UsageError(f"unknown --model-option {', '.join(map(repr, unknown))} for the model {name!r}; it takes: "
                         f"{', '.join(takes) or 'no options'}")
    for key in ("loss", "reg", "label_smoothing"):
        if config[key] != DEFAULTS[key] and not any_keyword and key not in names:
            raise UsageError(f"{flag(key)} {shown(config[key])} cannot be applied: the model {name!r} does not take "
                             f"{key}")


def optim_options(rule_name, options):
    """The update-rule hyper-parameters `options` checked against the rule's: its keys are those the rule fills in
    when called with an empty config (learning_rate, which is --lr, and its state excepted: arrays, and scalars that
    change from one step to the next); each value must have the type of the default (an integer is accepted for a
    float). Returns them with the defaults' types; UsageError naming the key otherwise."""
    from . import registry

    if "learning_rate" in options:
        raise UsageError("--optim learning_rate: the learning rate is --lr")
    rule = registry.get_update_rule(rule_name)
    w, dw = np.linspace(-1.0, 1.0, 6).reshape(2, 3), np.linspace(0.5, -0.5, 6).reshape(2, 3)
    try:
        _, first = rule(w.copy(), dw, {})
        first = {key: value for key, value in first.items() if not isinstance(value, np.ndarray)}
        _, second = rule(w.copy(), dw, dict(first))
    except (Exception, SystemExit) as exc:  # a plugin's rule: report it, do not crash (nor let it end the run)
        raise UsageError(f"cannot learn the hyper-parameters of the update rule {rule_name!r} (it failed on a "
                         f"2x3 array: {type(exc).__name__}: {exc})") from None
    defaults = {key: value for key, value in first.items()
                if key != "learning_rate" and isinstance(value, (*_SCALARS, np.generic))
                and second.get(key) == value}
    checked = {}
    for key, value in options.items():
        if key not in defaults:
            accepted = ", ".join(f"{k} (default {format_value(_plain(v))})" for k, v in sorted(defaults.items()))
            raise UsageError(f"unknown --optim key {key!r} for the update rule {rule_name!r}; it accepts: "
                             f"{accepted or 'none (besides the learning rate, --lr)'}")
        default = _plain(defaults[key])
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            wanted, value = "a finite number", float(value) if ok else value
        else:
            ok, wanted = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise UsageError(f"--optim {key} must be {wanted} (the update rule {rule_name!r} has {key} = "
                             f"{format_value(default)} by default), got {format_value(value)}")
        checked[key] = value
    return checked


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


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


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # a TOML integer, float or basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{value!r} has no TOML form")


def _toml_key(key):
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


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
                tables += ["", f"[{key.replace('_', '-')}]"] + [f"{_toml_key(k)} = {_toml_value(v)}"
                                                                 for k, v in value.items()]
            continue
        lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"
