"""Whether a resolved configuration is valid (check_config): ranges, names of layers, rules and models, a plugin
model's options, the update rule's --optim keys. Bad input raises UsageError naming the flag."""

import difflib
import inspect
import math

import numpy as np

from .config import (DEFAULTS, DTYPES, FLAGS, MODEL_RUN_KEYS, NUM_TRAIN_MAX, SCHEDULES, UsageError, did_you_mean,
                     flag, shown)
from .config_values import SCALARS, format_value


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
    need(config["zca"] >= 0, "zca", "an epsilon >= 0 (0: off)")
    for key in ("mixup", "cutmix"):
        need(config[key] >= 0, key, "an alpha >= 0 (0: off)")
    for key in ("mix_probability", "cutmix_probability"):
        need(0 <= config[key] <= 1, key, "a probability in [0, 1]")
    need(0 <= config["ema"] < 1, "ema", "a decay in (0, 1), or 0 (off)")
    need(config["ema_every"] >= 1, "ema_every", "a positive integer")
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
            check_layer_names(config["layers"])
        if config["model"] is not None:
            check_model(config)
        elif config["model_options"]:
            raise UsageError(f"--model-option {shown(config['model_options'])} needs --model (the options are a "
                             f"plugin model's; --layers takes its layers' options in the spec)")
        if config["optim"]:
            config["optim"] = optim_options(config["update_rule"], config["optim"])
    except registry.PluginError as exc:
        raise UsageError(f"a plugin is broken: {exc}") from None
    need(config["label_smoothing"] == 0 or config["loss"] == "softmax", "label_smoothing",
         "0 with a loss other than softmax")
    check_mixing_loss(config)
    from .parallel.environment import processes_on_this_node

    run_checks.check_memory(config, processes_on_this_node())
    run_checks.check_blas_threads(config)


def mixing_key(config):
    """The key that turns mixing on ("mixup" or "cutmix"), or None when it is off."""
    return next((key for key in ("mixup", "cutmix") if config[key] > 0 and config["mix_probability"] > 0), None)


def check_mixing_loss(config):
    """UsageError when --mixup or --cutmix is on with a loss that does not take soft targets (dpnet.mixing)."""
    from . import registry

    key = mixing_key(config)
    if key and not getattr(registry.get_layer("loss", config["loss"]).forward, "soft_targets", False):
        raise UsageError(f"{flag(key)} {shown(config[key])} needs a loss that takes soft targets (softmax); the loss "
                         f"{config['loss']!r} does not")


def check_layer_names(spec):
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


def check_model(config):
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
                if key != "learning_rate" and isinstance(value, (*SCALARS, np.generic))
                and second.get(key) == value}
    checked = {}
    for key, value in options.items():
        if key not in defaults:
            accepted = ", ".join(f"{k} (default {format_value(plain(v))})" for k, v in sorted(defaults.items()))
            raise UsageError(f"unknown --optim key {key!r} for the update rule {rule_name!r}; it accepts: "
                             f"{accepted or 'none (besides the learning rate, --lr)'}")
        default = plain(defaults[key])
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


def plain(value):
    return value.item() if isinstance(value, np.generic) else value
