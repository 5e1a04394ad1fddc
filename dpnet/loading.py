"""A trained model from a checkpoint (`load_model`), and what checkpoints record to make that possible.

Besides the Solver's state (dpnet.checkpoint), a checkpoint records:
- meta["architecture"]: how to build the network again, for a FullyConnectedNet or a dpnet.models.Sequential
  (`architecture`); a model of another class is rebuilt from the command line's configuration, meta["config"]
  (`--model` and its options, through the providing plugin's dpnet_models hook);
- meta["providers"]: for every name the network takes from a plugin (layer, activation, normalization, loss, model),
  the plugin and distribution that provided it, so that loading without the plugin names what to install;
- the array "mean_image": float64 (3, 32, 32), the image subtracted from every input in training, when the training
  images carried it (dpnet.data.ImageArray, as the command line's do);
- the array "zca": float32 (3072, 3072), the ZCA matrix that then whitened them, when the run had --zca
  (dpnet.data.whitening; only beside a mean image);
- meta["test_flips"]: whether the model scored images as the average of them and their mirrors
  (dpnet.flip_average.FlipAveraged, `--test-flips`); the architecture and the class in meta["model"] are then those of
  the model it wraps, and `load_model` wraps the rebuilt model again.
Checkpoints written before these entries existed are rebuilt from meta["config"] alone.
"""

import json

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
WHICH = ("best", "final")
_SPEC_KINDS = ("layer", "activation", "normalization")  # what a Sequential's names may be, in resolve()'s order


class ModelLoadError(CheckpointError):
    """The checkpoint's model cannot be rebuilt: a plugin it needs is missing, it does not say how, or its arrays
    do not fit the model it describes."""


# ----------------------------------------------------------------------------------------------- what is recorded
def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def architecture(model):
    """How to build `model` again, as a JSON-able dict with "type" FullyConnectedNet or Sequential; None for a model
    of another class (or one whose options JSON cannot hold)."""
    from .classifiers.fc_net import FullyConnectedNet
    from .models import Sequential

    if type(model) is Sequential:
        record = dict(type="Sequential", layers=[{k: _plain(v) for k, v in entry.items()} for entry in model.spec],
                      input_dim=list(model.input_shape))
    elif isinstance(model, FullyConnectedNet) and type(model).loss is FullyConnectedNet.loss:
        hidden = [int(model.params[f"W{i}"].shape[1]) for i in range(1, model.num_layers)]
        record = dict(type="FullyConnectedNet", hidden_dims=hidden, input_dim=model.input_dim,
                      num_classes=model.num_classes, activation=model._activation.name,
                      normalization=model._norm.name if model._norm is not None else None,
                      dropout=float(model.dropout_param["p"]) if model.use_dropout else 1.0)
    else:
        return None
    record.update(loss=model._loss.name, reg=float(model.reg), label_smoothing=float(model.label_smoothing),
                  dtype=np.dtype(model.dtype).name)
    try:
        return json.loads(json.dumps(record))
    except (TypeError, ValueError):
        return None


def _needed(record, config):
    """[(kinds, name)] of the registered names the network needs: it needs a registered name of one of `kinds`."""
    config = config or {}
    if record is None:
        if config.get("model") is not None:
            return [(("model",), config["model"])]
        if config.get("layers") is not None:
            record = {"type": "Sequential", "layers": config["layers"], "loss": config.get("loss", "softmax")}
        elif config.get("hidden_dims") is not None:
            norm = config.get("normalization")
            record = {"type": "FullyConnectedNet", "activation": config.get("activation", "relu"),
                      "normalization": None if norm in (None, "none") else norm, "loss": config.get("loss")}
        else:
            return []
    needed = [(("loss",), record["loss"])] if record.get("loss") else []
    if record["type"] == "Sequential":
        names = [entry["layer"] if isinstance(entry, dict) else entry for entry in record["layers"]]
        return [(_SPEC_KINDS, name) for name in dict.fromkeys(names)] + needed
    norm = [(("normalization",), record["normalization"])] if record.get("normalization") else []
    return [(("activation",), record["activation"])] + norm + needed


def _loaded_plugins():
    """{(kind, name): PluginInfo} of every name the loaded plugins (and the built-ins) provide."""
    from .plugins import registry

    table = {}
    for info in registry.list_plugins():
        if info.status == "loaded":
            table.update({(kind, name): info for kind, names in info.layers.items() for name in names})
            table.update({("model", name): info for name in info.models})
    return table


def model_record(model, config=None):
    """The meta entries a checkpoint of `model` carries: {"architecture": ..., "providers": [{"kind", "name",
    "plugin", "distribution", "version"}, ...] (plugins only; dpnet's built-ins are not listed), "test_flips": bool}
    (for a FlipAveraged, the architecture and providers of the model it wraps)."""
    from .flip_average import FlipAveraged, unwrap

    flips, model = isinstance(model, FlipAveraged), unwrap(model)
    record = architecture(model)
    table, providers = _loaded_plugins(), []
    factory = [(("model",), config["model"])] if record is not None and (config or {}).get("model") else []
    for kinds, name in _needed(record, config) + factory:  # (a plugin's model rebuilt from its record: named too)
        kind = next((k for k in kinds if (k, name) in table), None)
        info = table.get((kind, name))
        if info is not None and not info.builtin:
            providers.append(dict(kind=kind, name=name, plugin=info.name, distribution=info.distribution,
                                  version=info.version))
    return {"architecture": record, "providers": providers, "test_flips": flips}


# ----------------------------------------------------------------------------------------------- loading
def _missing_message(path, missing, meta):
    """The error for names no installed plugin provides: each with the plugin that provided it when saved."""
    from .plugins import registry

    recorded = {p["name"]: p for p in meta.get("providers", ()) if isinstance(p, dict) and "name" in p}
    disabled = [info for info in registry.list_plugins() if info.status == "disabled"]
    parts = []
    for kinds, name in missing:
        saved = recorded.get(name)
        kind = saved.get("kind") if saved is not None and saved.get("kind") in kinds else kinds[0]
        what = f"the {kind} {name!r}"
        if saved is None:
            parts.append(f"{what}, which no installed plugin provides (the checkpoint does not record which plugin "
                         f"did)")
            continue
        dist = saved.get("distribution") or "its distribution"
        who = f"{dist} {saved.get('version') or ''}".strip() + f" (plugin {saved.get('plugin')!r})"
        off = next((i for i in disabled if saved.get("plugin") == i.name or dist == i.distribution), None)
        state = (f"installed but disabled ({off.reason})" if off is not None
                 else f"not installed (pip install {dist})")
        parts.append(f"{what} of the plugin {who}, which is {state}")
    return (f"checkpoint {path} cannot be loaded: its network needs " + "; and ".join(parts)
            + ". `python -m dpnet.plugins` lists what is installed")


def _check_installed(path, meta, record):
    from .plugins import registry

    try:
        available = {kind: registry.available(kind) for kind in (*_SPEC_KINDS, "loss", "model")}
    except registry.PluginError as exc:
        raise ModelLoadError(f"checkpoint {path} cannot be loaded: a plugin is broken: {exc}") from None
    try:
        missing = [(kinds, name) for kinds, name in _needed(record, meta.get("config"))
                   if not any(name in available[kind] for kind in kinds)]
    except (KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"checkpoint {path} is not a readable dpnet checkpoint: its meta architecture or "
                             f"configuration is malformed") from None
    if missing:
        raise ModelLoadError(_missing_message(path, missing, meta))


def _build(path, record, config):
    """The model the record (else the command line's configuration) describes, freshly initialized."""
    from .config import DEFAULTS, UsageError

    try:
        if record is None:
            if not config:
                raise ModelLoadError(f"checkpoint {path} does not say how to build its model: it holds no "
                                     f"configuration and its model is not a FullyConnectedNet or a Sequential")
            from .train import build_model

            return build_model({**DEFAULTS, **config, "test_flips": False})  # (read_model wraps it)
        kwargs = dict(loss=record["loss"], reg=record["reg"], dtype=np.dtype(record["dtype"]), seed=0,
                      label_smoothing=record["label_smoothing"])
        if record["type"] == "Sequential":
            from .models import Sequential

            return Sequential(record["layers"], input_dim=tuple(record["input_dim"]), **kwargs)
        if record["type"] == "FullyConnectedNet":
            from .classifiers.fc_net import FullyConnectedNet

            return FullyConnectedNet(record["hidden_dims"], input_dim=record["input_dim"],
                                     num_classes=record["num_classes"], dropout=record["dropout"],
                                     normalization=record["normalization"], activation=record["activation"], **kwargs)
        raise ModelLoadError(f"checkpoint {path} describes a model of unknown type {record['type']!r}")
    except ModelLoadError:
        raise
    except KeyError as exc:
        raise ModelLoadError(f"checkpoint {path}: its model cannot be rebuilt: its recorded architecture has no "
                             f"{exc}") from None
    except (UsageError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"checkpoint {path}: its model cannot be rebuilt: {exc}") from None


def _load_arrays(path, model, arrays, which):
    """Put the `which` parameters and normalization state of the checkpoint into `model`."""
    prefix, norm_prefix = {"best": ("best/", "best_norm/"), "final": ("param/", "norm/")}[which]
    saved = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
    if not saved:
        raise ModelLoadError(f"checkpoint {path} holds no {which} parameters"
                             + (" (it was written before the first evaluation): load the final ones"
                                if which == "best" else ""))
    problems = [f"{name} is in the checkpoint but not in the model" for name in sorted(set(saved) - set(model.params))]
    problems += [f"{name} is in the model but not in the checkpoint" for name in sorted(set(model.params) - set(saved))]
    for name in sorted(set(saved) & set(model.params)):
        ours, theirs = model.params[name], saved[name]
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            problems.append(f"{name} is {theirs.dtype}{list(theirs.shape)} in the checkpoint but "
                            f"{ours.dtype}{list(ours.shape)} in the model it describes")
    norms = getattr(model, "bn_params", None) or []
    for key in (k for k in arrays if k.startswith(norm_prefix)):
        index, _, name = key[len(norm_prefix):].partition("/")
        if not index.isdigit() or int(index) >= len(norms):
            problems.append(f"the normalization state {key} has no layer in the model")
    for key in (k for k in arrays if k.startswith((prefix, norm_prefix))):
        value = arrays[key]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            problems.append(f"{key} holds NaN or infinite values")
    if problems:
        raise ModelLoadError(f"checkpoint {path} does not match the model it describes: " + "; ".join(problems))
    model.params.update(saved)
    for key in (k for k in arrays if k.startswith(norm_prefix)):
        index, _, name = key[len(norm_prefix):].partition("/")
        norms[int(index)][name] = arrays[key]


def set_test_mode(model):
    """Put the model's normalization and dropout layers in test mode (loss(X) without labels also does)."""
    for param in getattr(model, "bn_params", None) or []:
        param["mode"] = "test"
    if isinstance(getattr(model, "dropout_param", None), dict):
        model.dropout_param["mode"] = "test"


def class_names(num_classes):
    """CIFAR-10's class names for 10 classes, else "class 0", "class 1", ..."""
    return CIFAR10_CLASSES if num_classes == 10 else tuple(f"class {i}" for i in range(num_classes))


def read_model(path, which="best", test_flips=None):
    """(model, meta): load_model's model and the checkpoint's meta document (configuration, counters, histories)."""
    if which not in WHICH:
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    if test_flips not in (None, True, False):
        raise ValueError(f"test_flips must be None, True or False, got {test_flips!r}")
    arrays, meta = load_checkpoint(path)
    record = meta.get("architecture")
    if not isinstance(record, (dict, type(None))) or not isinstance(meta.get("providers", []), list):
        raise ModelLoadError(f"checkpoint {path} is not a readable dpnet checkpoint: its meta architecture or "
                             f"providers are malformed")
    _check_installed(path, meta, record)
    model = _build(path, record, meta.get("config"))
    _load_arrays(path, model, arrays, which)
    set_test_mode(model)
    mean = arrays.get("mean_image")  # (and zca, of the mean's size: checked by load_checkpoint)
    if mean is not None and (mean.dtype.kind != "f" or mean.size != getattr(model, "input_dim", mean.size)):
        raise ModelLoadError(f"checkpoint {path} holds a mean image of {mean.dtype} {list(mean.shape)}, which does "
                             f"not fit the model's input")
    model.mean_image, model.zca = mean, arrays.get("zca")
    num_classes = getattr(model, "num_classes", None)
    model.class_names = class_names(num_classes) if num_classes is not None else None
    flips = saved_test_flips(path, meta) if test_flips is None else test_flips
    if flips:
        from .flip_average import FlipAveraged

        try:
            model = FlipAveraged(model)
        except ValueError as exc:
            raise ModelLoadError(f"checkpoint {path} cannot be scored with test-time flips: {exc}") from None
    return model, meta


def saved_test_flips(path, meta):
    """Whether the checkpoint's model scored images with test-time flips: meta["test_flips"], else (checkpoints
    written before it) the run's configuration's `test_flips`, else False."""
    flips = meta.get("test_flips", (meta.get("config") or {}).get("test_flips", False))
    if not isinstance(flips, bool):
        raise ModelLoadError(f"checkpoint {path} is not a readable dpnet checkpoint: its meta test_flips is not true "
                             f"or false")
    return flips


def load_model(path, which="best", test_flips=None):
    """The model saved in the checkpoint at `path`, in test mode, ready for `model.loss(X)`.

    Inputs:
    - path: a checkpoint (`best.npz`, `last.npz` of a `python -m dpnet.train` run, or any dpnet.checkpoint file)
    - which: "best" (the parameters and normalization state with the best validation accuracy so far) or "final"
      (those the run had when the checkpoint was written: the final ones in the `last.npz` of a finished run)
    - test_flips: None (as the checkpoint's run scored images: its `--test-flips`), True (score each image as the
      average of it and its left-right mirror, dpnet.flip_average.FlipAveraged) or False (the images alone)
    Returns the model its saved architecture or configuration describes (a FullyConnectedNet, a Sequential with
    plugin layers, a plugin's model; wrapped in a FlipAveraged with test flips), with three attributes added:
    `mean_image`, float64 (3, 32, 32), the image subtracted from every training input (None when the checkpoint does
    not hold it; see `preprocess`), `zca`, float32 (3072, 3072), the ZCA matrix that then whitened the training
    inputs (None for a run without --zca), and `class_names` (CIFAR-10's for 10 classes). Nothing is unpickled. Raises
    CheckpointError (ModelLoadError, naming the missing layer and plugin, when a plugin it needs is not installed, or
    saying why a model of inputs other than images cannot be scored with test flips).
    """
    return read_model(path, which, test_flips)[0]


def preprocess(model, images):
    """Images as the model takes them, made as the training images were: float64 (images - model.mean_image) rounded
    once to the model's dtype; for a model trained on whitened images (`model.zca`, --zca), that difference rounded to
    float32 and whitened by dpnet.data.whitening.whiten (float32 products, in the model's dtype), the very bits
    training and dpnet.evaluate give each image. images: pixel values (N, 3, 32, 32) (uint8 or any real type).
    ValueError when the model has no mean image."""
    if getattr(model, "mean_image", None) is None:
        raise ValueError("the model has no mean image: its checkpoint does not record the one of its training")
    centered, dtype = np.subtract(images, model.mean_image, dtype=np.float64), np.dtype(model.dtype)
    zca = getattr(model, "zca", None)
    if zca is None:
        return centered.astype(dtype, copy=False)
    from .data.whitening import whiten

    if centered.ndim == model.mean_image.ndim:  # one image
        return whiten(centered[None], zca, dtype)[0]
    return whiten(centered, zca, dtype)
