"""Where a run's configuration comes from (resolve_config): DEFAULTS < the configuration saved in the --resume
checkpoint < the --config TOML file (its keys are the flag names, with '-' or '_') < the flags given; the tables
(optim, model_options) merge key by key. A resumed run continues the saved configuration; only the keys in
RESUME_MAY_CHANGE may differ from it, and where it writes (NOT_FROM_CHECKPOINT) comes from this invocation."""

import tomllib

from .config import (DEFAULTS, FC_KEYS, FLAGS, NOT_FROM_CHECKPOINT, RESUME_MAY_CHANGE, TABLE_KEYS, UsageError, flag,
                     shown)
from .config_values import layer_entries, scalar_table


def typed_value(key, value, source):
    """value (from a TOML file) checked against the kind of `key`; UsageError otherwise."""
    kind = FLAGS[key][0]
    if kind == "layers":
        try:
            return layer_entries(value)
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None
    if kind == "options":
        try:
            return scalar_table(key, value)
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None
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
            config[key] = typed_value(key, value, path)
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
    saved = {key: None if value is None and (key in FC_KEYS or DEFAULTS[key] is None)
             else typed_value(key, value, source)
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
