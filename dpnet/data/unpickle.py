"""Loading CIFAR-10 batch files safely: a restricted unpickler, then a check of what the file held.

Pickles run code when loaded, so a batch is read by an unpickler that admits only the three numpy names the official
files contain (``UnsafePickleError`` otherwise, with nothing run), and its content is validated (``BatchFormatError``).
"""

import pickle

import numpy as np

from .layout import IMAGE_SHAPE, NUM_CLASSES, TEST_FILE, TRAIN_FILES


class UnsafePickleError(ValueError):
    """A batch file refers to a global that the official CIFAR-10 files do not contain; nothing was run."""

    def __init__(self, filename, module, name):
        self.filename, self.module, self.name = filename, module, name
        super().__init__(f"{filename}: refusing to unpickle the global '{module}.{name}': a CIFAR-10 batch only "
                         f"refers to numpy's ndarray, dtype and _reconstruct (the file is not an official batch; "
                         f"it may try to run code)")


class BatchFormatError(ValueError):
    """A batch file is truncated, corrupt, or does not hold what a CIFAR-10 batch holds."""


def _safe_globals():
    """The only globals a CIFAR-10 batch may name, mapped to the objects to use: {(module, name): object}.

    The official files were written by Python 2 numpy and name numpy.core.multiarray._reconstruct, numpy.ndarray and
    numpy.dtype; a file re-pickled by numpy >= 2 names numpy._core.multiarray._reconstruct. Both module paths map
    to the function itself, so numpy 2 never imports its deprecated numpy.core shim.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class admits only _safe_globals(); anything else raises UnsafePickleError."""

    def __init__(self, file, filename):
        super().__init__(file, encoding="bytes")
        self._filename = filename
        self._allowed = _safe_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(self._filename, module, name) from None


def _unpickle(filename):
    """Unpickle one file with the restricted unpickler; errors name the file."""
    with open(filename, "rb") as f:
        try:
            return _RestrictedUnpickler(f, filename).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError) as err:
            raise BatchFormatError(f"{filename}: not a valid CIFAR-10 batch (truncated or corrupt pickle: "
                                   f"{type(err).__name__}: {err})") from err


def _check_batch(batch, filename):
    """Validate an unpickled batch and return (X uint8 (N, 3, 32, 32), y int64 (N,)); errors name the file."""
    def bad(what):
        return BatchFormatError(f"{filename}: not a valid CIFAR-10 batch: {what}")

    if not isinstance(batch, dict):
        raise bad(f"expected a dict, found {type(batch).__name__}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise bad(f"the key {key!r} is missing (keys: {sorted(map(repr, batch))})")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != np.prod(IMAGE_SHAPE) or data.shape[0] == 0:
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
        raise bad(f"b'data' must be a uint8 array of shape (N, 3072) with N >= 1, found {dtype} {shape}")
    y = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if y is None or y.dtype.kind not in "iu" or y.shape != (data.shape[0],):
        shape, dtype = getattr(y, "shape", None), getattr(y, "dtype", type(labels).__name__)
        raise bad(f"b'labels' must be {data.shape[0]} integers (one per image), found {dtype} {shape}")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise bad(f"labels must lie in 0..{NUM_CLASSES - 1}, found {y.min()}..{y.max()}")
    X = np.ascontiguousarray(data).reshape((data.shape[0],) + IMAGE_SHAPE)
    return X, y.astype(np.int64)


def load_CIFAR_batch(filename):
    """Load one CIFAR-10 batch file.

    Input: filename: path of a pickled batch (e.g. .../cifar-10-batches-py/data_batch_1).
    Returns a tuple of:
    - X: uint8 array of shape (N, 3, 32, 32), channels first
    - y: int64 array of shape (N,), labels in 0..9
    Raises UnsafePickleError if the file names a global an official batch does not (nothing is run), and
    BatchFormatError if it is truncated, corrupt or has the wrong content.
    """
    return _check_batch(_unpickle(filename), filename)


def load_batches(root):
    """Load every batch of a cifar-10-batches-py folder (a Path).

    Returns (Xtr uint8 (50000, 3, 32, 32), ytr int64 (50000,), Xte uint8 (10000, 3, 32, 32), yte int64 (10000,)).
    """
    train = [load_CIFAR_batch(root / name) for name in TRAIN_FILES]
    Xte, yte = load_CIFAR_batch(root / TEST_FILE)
    Xtr = np.concatenate([X for X, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return Xtr, ytr, Xte, yte
