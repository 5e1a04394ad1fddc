"""CIFAR-10 loaded whole (``load_CIFAR10_raw``, ``load_CIFAR10``), or split and preprocessed as in CS231n.

``get_CIFAR10_data`` is the assignment's entry point: it returns the CS231n dict of six arrays. With ``lazy=True`` its
images are ``ImageArray`` objects that hold the uint8 images and convert (mean subtraction included) only the rows a
minibatch selects; the values are bit for bit those of the eager path.
"""

import operator
from pathlib import Path

import numpy as np

from .cache import cache_dir, load_cached
from .images import ImageArray, check_float_dtype
from .locate import find_data_dir, locate_CIFAR10
from .unpickle import load_batches


def load_CIFAR10_raw(root, cache=True):
    """Load all of CIFAR-10 as uint8 images.

    Inputs: root: the cifar-10-batches-py folder or the folder holding it; cache: True (the cache in cache_dir()),
    a folder to keep the cache in, or False (read the batches, keep them in memory).
    Returns a tuple of:
    - Xtr: uint8 (50000, 3, 32, 32), read-only and memory-mapped from the cache when cache is not False
    - ytr: int64 (50000,)
    - Xte: uint8 (10000, 3, 32, 32)
    - yte: int64 (10000,)
    The cache is keyed by the path, sizes and modification times of the batch files and rebuilt when they change or
    when it is corrupt; if it cannot be written, a DataCacheWarning is issued and the images stay in memory.
    """
    root = find_data_dir(root)
    if cache is False:
        return load_batches(root)
    return load_cached(root, cache_dir() if cache is True else Path(cache).expanduser())


def load_CIFAR10(root, dtype=np.float64, cache=True):
    """Load all of CIFAR-10 as floating point images (no preprocessing), as in CS231n but channels first.

    Inputs: root: the cifar-10-batches-py folder or the folder holding it; dtype: floating dtype of the images;
    cache: as in load_CIFAR10_raw.
    Returns a tuple of Xtr (50000, 3, 32, 32), Ytr int64 (50000,), Xte (10000, 3, 32, 32), Yte int64 (10000,).
    """
    dtype = check_float_dtype(dtype)
    Xtr, ytr, Xte, yte = load_CIFAR10_raw(root, cache=cache)
    return Xtr.astype(dtype), ytr, Xte.astype(dtype), yte


def _check_count(value, name, minimum):
    """int(value), which must be an integer >= minimum; ValueError/TypeError naming the argument otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_split(num_training, num_validation, num_test, n_train, n_test):
    """Check the split sizes against the numbers of images available; errors name the arguments."""
    if num_training + num_validation > n_train:
        raise ValueError(f"num_training + num_validation = {num_training} + {num_validation} = "
                         f"{num_training + num_validation} exceeds the {n_train} training images")
    if num_test > n_test:
        raise ValueError(f"num_test = {num_test} exceeds the {n_test} test images")


def get_CIFAR10_data(num_training=49000, num_validation=1000, num_test=1000, subtract_mean=True, data_dir=None,
                     dtype=np.float64, lazy=False, download=True, cache=True):
    """Load CIFAR-10 and split and preprocess it as in CS231n (channels first).

    Inputs:
    - num_training: images 0..num_training-1 of the training batches form X_train
    - num_validation: the next num_validation training images form X_val
    - num_test: the first num_test images of test_batch form X_test
    - subtract_mean: subtract the mean image of X_train (per pixel and channel, computed exactly in float64)
    - data_dir: the cifar-10-batches-py folder or the folder holding it (None: $DPNET_DATA_DIR, else
      default_data_dir()); download: fetch the data there once if it is missing (see locate_CIFAR10)
    - dtype: floating dtype of the images; lazy: return ImageArrays that convert rows as they are indexed
    - cache: as in load_CIFAR10_raw (True: memory-mapped uint8 cache in cache_dir(); False: no cache)
    Returns a dict with exactly the keys X_train (num_training, 3, 32, 32), y_train (num_training,),
    X_val (num_validation, 3, 32, 32), y_val (num_validation,), X_test (num_test, 3, 32, 32), y_test (num_test,).
    Labels are int64. Images are dtype ndarrays, or ImageArrays if lazy; these expose the subtracted mean image as
    .mean_image (zeros if subtract_mean is False).
    """
    num_training = _check_count(num_training, "num_training", 1)
    num_validation = _check_count(num_validation, "num_validation", 0)
    num_test = _check_count(num_test, "num_test", 0)
    dtype = check_float_dtype(dtype)
    Xtr, ytr, Xte, yte = load_CIFAR10_raw(locate_CIFAR10(data_dir, download=download), cache=cache)
    _check_split(num_training, num_validation, num_test, len(Xtr), len(Xte))
    train, val = slice(0, num_training), slice(num_training, num_training + num_validation)
    mean = Xtr[train].sum(axis=0, dtype=np.int64) / num_training if subtract_mean else None
    images = {"train": Xtr[train], "val": Xtr[val], "test": Xte[:num_test]}
    labels = {"train": ytr[train], "val": ytr[val], "test": yte[:num_test]}
    data = {}
    for split in ("train", "val", "test"):
        X = ImageArray(images[split], mean, dtype)
        data[f"X_{split}"] = X if lazy else np.asarray(X)
        data[f"y_{split}"] = labels[split].copy()
    return data
