"""What the Solver checks before it trains: the data, the sizes against the processes, the recipe's options; and
which keywords a callable takes (a model's loss, a rule's in-place variant)."""

import functools
import inspect

import numpy as np

from .parallel import check_shardable


def check_data(model, data):
    """ValueError unless data's splits hold as many integer labels in [0, model.num_classes) as samples, and finite
    float images."""
    if len(data["y_train"]) == 0:
        raise ValueError("the training set is empty (data['X_train'] has no samples)")
    for split in ("train", "val"):
        X, y = data[f"X_{split}"], np.asarray(data[f"y_{split}"])
        if y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValueError(f"data['X_{split}'] has {X.shape[0]} samples but data['y_{split}'] has shape "
                             f"{y.shape}: expected ({X.shape[0]},)")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"data['y_{split}'] must hold integer labels, got dtype {y.dtype}")
        num_classes = getattr(model, "num_classes", None)
        if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            raise ValueError(f"data['y_{split}'] has labels in [{y.min()}, {y.max()}], outside "
                             f"[0, {num_classes if num_classes is not None else 'C'})")
        if isinstance(X, np.ndarray) and X.dtype.kind == "f" and not np.isfinite(X).all():
            raise ValueError(f"data['X_{split}'] contains NaN or inf")


def check_sizes(batch_size, num_epochs, num_train, num_processes):
    """ValueError unless every process gets at least one sample of every batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs < 0:
        raise ValueError(f"num_epochs must be >= 0, got {num_epochs}")
    if batch_size < num_processes:
        raise ValueError(f"the global batch_size ({batch_size}) is smaller than the number of processes "
                         f"({num_processes}): every process needs at least one sample")
    if num_train < num_processes:
        raise ValueError(f"the training set has {num_train} samples, fewer than the number of processes "
                         f"({num_processes}): every process needs at least one sample")


def check_recipe(solver):
    """ValueError (or dpnet.parallel.ShardError) for options of `solver` that do not go together."""
    if solver.augment is not None and getattr(solver.X_train, "ndim", 0) != 4:
        raise ValueError(f"augment needs images of shape (N, C, H, W); data['X_train'] has shape "
                         f"{solver.X_train.shape}")
    if solver.lr_schedule is not None:
        if solver.lr_decay != 1.0:
            raise ValueError("give lr_decay or lr_schedule, not both")
        if "learning_rate" not in solver.optim_config:
            raise ValueError("lr_schedule needs optim_config['learning_rate'], the rate it scales")
    if solver.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {solver.weight_decay}")
    if solver.mixing is not None:
        check_mixing(solver.mixing, solver.model, solver.X_train)
    if solver.shard_optimizer:
        rule = solver.update_rule
        check_shardable(solver.rule, rule if isinstance(rule, str) else getattr(rule, "__name__", repr(rule)))
        if solver.weight_decay and "learning_rate" not in solver.optim_config:
            raise ValueError("weight_decay with shard_optimizer needs optim_config['learning_rate']")


def check_mixing(mixing, model, X_train):
    """TypeError or ValueError unless `mixing` is a dpnet.mixing.Mixing that the model and the images can take: a loss
    that takes soft targets (model.soft_targets), model.num_classes, and for CutMix images (N, C, H, W)."""
    from .mixing import Mixing

    if not isinstance(mixing, Mixing):
        raise TypeError(f"mixing must be a dpnet.mixing.Mixing or None, got {type(mixing).__name__}")
    if not mixing.enabled:
        return
    if not getattr(model, "soft_targets", False):
        loss = getattr(getattr(model, "_loss", None), "name", None)
        which = f"the loss {loss!r} does not" if loss else f"a {type(model).__name__} does not say it does"
        raise ValueError(f"mixing (MixUp, CutMix) trains on soft targets (N, C), so it needs a model whose loss takes "
                         f"them, as the softmax does; {which} (model.soft_targets)")
    if not isinstance(getattr(model, "num_classes", None), (int, np.integer)):
        raise ValueError("mixing needs model.num_classes, the number of classes C of its soft targets")
    if mixing.cutmix > 0 and getattr(X_train, "ndim", 0) != 4:
        raise ValueError(f"cutmix needs images of shape (N, C, H, W); data['X_train'] has shape "
                         f"{getattr(X_train, 'shape', None)}")


@functools.lru_cache(maxsize=128)
def _signature_has(function, keyword):
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no inspectable signature
        return False


def accepts_keyword(function, keyword):
    """Whether `function` takes the keyword argument `keyword` (cached for hashable functions)."""
    try:
        return _signature_has(function, keyword)
    except TypeError:  # an unhashable callable
        return _signature_has.__wrapped__(function, keyword)
