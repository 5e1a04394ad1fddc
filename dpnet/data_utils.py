"""CIFAR-10: locate, load safely, cache, split and preprocess (downloading is dpnet.download's job).

The data is the official python layout: a folder ``cifar-10-batches-py`` holding the pickled batches
``data_batch_1`` .. ``data_batch_5`` (10000 training images each), ``test_batch`` (10000 test images) and
``batches.meta``. Each batch is a dict ``{b'data': uint8 (10000, 3072), b'labels': [int in 0..9] * 10000, ...}``;
a row of ``data`` is one 32x32 image stored channel by channel (1024 red, 1024 green, 1024 blue values), so it
reshapes to (3, 32, 32) without copying. Images are kept channels first, X: (N, 3, 32, 32).

Where things live:
- the data directory: the ``data_dir`` argument, else ``$DPNET_DATA_DIR``, else ``~/.cache/dpnet/data`` (under
  ``$XDG_CACHE_HOME`` when it is set). It may name the ``cifar-10-batches-py`` folder itself or the folder that
  holds it. When the data is missing, ``locate_CIFAR10`` has it downloaded there by ``dpnet.download`` (from
  ``$DPNET_CIFAR10_URL`` or the official URL, checked against the official MD5). That module is imported only then,
  so a process that finds the data never imports the HTTP, URL and tar modules; its names (``download_CIFAR10``,
  ``ChecksumError``, ``ArchiveError``, ``DownloadError``, ``CIFAR10_URL``, ``CIFAR10_MD5``, ``URL_ENV``) are still
  reachable here, importing it on first access.
- the image cache: the raw uint8 images of both splits as ``.npy`` files in ``$DPNET_CACHE_DIR``, else
  ``~/.cache/dpnet`` (under ``$XDG_CACHE_HOME`` when set). They are opened with ``np.load(mmap_mode='r')``, so every
  process on one machine reads the same pages of the page cache instead of holding its own copy.

Pickles run code when loaded, so batches are read by a restricted unpickler that admits only the three numpy names
the official files contain (``UnsafePickleError`` otherwise), and their content is validated (``BatchFormatError``).

``get_CIFAR10_data`` is the entry point of the assignment: it returns the CS231n dict of six arrays. With
``lazy=True`` its images are ``ImageArray`` objects that hold the uint8 images and convert (mean subtraction
included) only the rows a minibatch selects; the values are bit for bit those of the eager path.
"""

import contextlib
import hashlib
import json
import operator
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process locks, writes stay atomic
    fcntl = None

CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
REQUIRED_FILES = TRAIN_FILES + (TEST_FILE,)
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10

DATA_DIR_ENV = "DPNET_DATA_DIR"
CACHE_DIR_ENV = "DPNET_CACHE_DIR"

_CACHE_FORMAT = 1  # bump to invalidate every existing cache file
_CHUNK_BYTES = 32 << 20  # float64 scratch memory per conversion step of a large ImageArray selection


# ----------------------------------------------------------------------------------------------------- errors
class UnsafePickleError(ValueError):
    """A batch file refers to a global that the official CIFAR-10 files do not contain; nothing was run."""

    def __init__(self, filename, module, name):
        self.filename, self.module, self.name = filename, module, name
        super().__init__(f"{filename}: refusing to unpickle the global '{module}.{name}': a CIFAR-10 batch only "
                         f"refers to numpy's ndarray, dtype and _reconstruct (the file is not an official batch; "
                         f"it may try to run code)")


class BatchFormatError(ValueError):
    """A batch file is truncated, corrupt, or does not hold what a CIFAR-10 batch holds."""


class CIFAR10NotFoundError(FileNotFoundError):
    """The CIFAR-10 batches are not where they were looked for."""

    incomplete = None  # the folder holding only some of the batch files, if any


class DataCacheWarning(UserWarning):
    """The image cache could not be written; the images are kept in memory instead."""


# ------------------------------------------------------------------------------------------- safe unpickling
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


def _load_batches(root):
    """Load every batch of a cifar-10-batches-py folder: (Xtr (50000, 3, 32, 32) uint8, ytr, Xte, yte) int64."""
    train = [load_CIFAR_batch(root / name) for name in TRAIN_FILES]
    Xte, yte = load_CIFAR_batch(root / TEST_FILE)
    Xtr = np.concatenate([X for X, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return Xtr, ytr, Xte, yte


# -------------------------------------------------------------------------------------------- where things live
def _user_cache_root():
    """Per-user cache root: $XDG_CACHE_HOME/dpnet if XDG_CACHE_HOME is an absolute path, else ~/.cache/dpnet."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dpnet"


def default_data_dir():
    """Where CIFAR-10 is looked for (and downloaded to) when neither data_dir nor $DPNET_DATA_DIR is given."""
    return _user_cache_root() / "data"


def cache_dir():
    """Folder of the uint8 image cache: $DPNET_CACHE_DIR, else the per-user cache root (~/.cache/dpnet)."""
    env = os.environ.get(CACHE_DIR_ENV, "")
    return Path(env).expanduser() if env else _user_cache_root()


def _chosen_data_dir(data_dir):
    """The data directory by precedence and where it came from: (Path, description)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser(), f"the environment variable {DATA_DIR_ENV}"
    return default_data_dir(), f"the default (neither data_dir nor {DATA_DIR_ENV} was given)"


def _missing_files(folder):
    """Names of the required batch files that folder lacks (all of them if it does not exist)."""
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def _candidates(base):
    """The folders that may hold the batches: base itself, then base/cifar-10-batches-py."""
    return [base, base / CIFAR10_FOLDER]


def find_data_dir(data_dir=None):
    """Find the folder holding the CIFAR-10 batches (data_batch_1..5, test_batch); nothing is downloaded.

    Input: data_dir: the cifar-10-batches-py folder or the folder holding it; None: $DPNET_DATA_DIR, else
    default_data_dir().
    Returns the Path of the folder that holds the batch files.
    Raises CIFAR10NotFoundError listing where it looked (attribute .incomplete is the folder that holds only some of
    the files, or None).
    """
    base, source = _chosen_data_dir(data_dir)
    for folder in _candidates(base):
        if not _missing_files(folder):
            return folder
    partial = next((f for f in _candidates(base) if len(_missing_files(f)) < len(REQUIRED_FILES)), None)
    err = CIFAR10NotFoundError(_not_found_message(base, source, partial))
    err.incomplete = partial
    raise err


def _not_found_message(base, source, partial):
    """The text of CIFAR10NotFoundError: where we looked, why there, and how to fix it."""
    looked = "\n".join(f"  {folder}" for folder in _candidates(base))
    msg = (f"CIFAR-10 not found: looked for {', '.join(REQUIRED_FILES)} in\n{looked}\n"
           f"(the data directory {base} comes from {source}).")
    if partial is not None:
        msg += (f"\n{partial} is incomplete: it lacks {', '.join(_missing_files(partial))}. Remove it and download "
                f"again, or copy the missing files there.")
    return msg + (f"\nPass data_dir=..., set {DATA_DIR_ENV} to the folder holding {CIFAR10_FOLDER}, or download it "
                  f"with locate_CIFAR10(download=True) / get_CIFAR10_data(download=True).")


def _download_destination(data_dir):
    """The folder a download extracts cifar-10-batches-py into."""
    base, _ = _chosen_data_dir(data_dir)
    return base.parent if base.name == CIFAR10_FOLDER else base


def locate_CIFAR10(data_dir=None, download=True, url=None, md5=None, progress=None):
    """Find the CIFAR-10 batches, downloading them once if they are missing and download is True.

    Inputs: data_dir as in find_data_dir; download: fetch the archive when the data is missing; url: the archive's
    URL (None: $DPNET_CIFAR10_URL, else the official URL); md5: its expected MD5 hex digest (None: the official
    archive's); progress: show a progress bar (None: only when stderr is a terminal).
    Returns the Path of the folder holding data_batch_1..5 and test_batch.
    Raises CIFAR10NotFoundError when the data is missing and not downloaded (download is False, or a folder holds
    only some of the files), else what download.download_CIFAR10 raises.
    """
    try:
        return find_data_dir(data_dir)
    except CIFAR10NotFoundError as err:
        if not download or err.incomplete is not None:
            raise
    # imported only now: the download needs the HTTP, URL and tar modules, which a process with the data never does
    from .download import download_CIFAR10
    return download_CIFAR10(_download_destination(data_dir), url=url, md5=md5, progress=progress)


# ------------------------------------------------------------------------------- the download (dpnet.download)
_DOWNLOAD_NAMES = frozenset({"download_CIFAR10", "ChecksumError", "ArchiveError", "DownloadError", "CIFAR10_URL",
                             "CIFAR10_MD5", "URL_ENV"})


def __getattr__(name):
    """The download's public names, still reachable here: dpnet.download is imported on their first access (PEP 562).

    So `import dpnet.data_utils` does not import the download (nor the HTTP, URL and tar modules it needs), and
    data_utils.ChecksumError is download.ChecksumError, the same class object.
    """
    if name in _DOWNLOAD_NAMES:
        from . import download
        return getattr(download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _DOWNLOAD_NAMES)


# ---------------------------------------------------------------------------------------------- the image cache
@contextlib.contextmanager
def _dir_lock(folder):
    """Hold an exclusive inter-process lock on a folder while inside (best effort: no lock where unsupported).

    Used for the image cache and, by dpnet.download, for the data directory.
    """
    fd = None
    try:
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _cache_key(root):
    """(folder key, content key) of a batches folder: hashes of its resolved path and of its files' sizes/mtimes."""
    stats = [(name, (root / name).stat()) for name in REQUIRED_FILES]
    content = json.dumps([_CACHE_FORMAT] + [[name, st.st_size, st.st_mtime_ns] for name, st in stats])
    folder = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return folder, hashlib.sha256(content.encode()).hexdigest()[:16]


def _cache_paths(cdir, key):
    """The four cache files of one key: {(split, part): Path} with split in train/test, part in images/labels."""
    folder, content = key
    return {(split, part): cdir / f"cifar10-{folder}-{content}-{split}-{part}.npy"
            for split in ("train", "test") for part in ("labels", "images")}


def _read_cache(cdir, key):
    """(Xtr, ytr, Xte, yte) from the cache (images memory-mapped, read-only), or None if missing or corrupt."""
    paths = _cache_paths(cdir, key)
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
    except (OSError, ValueError, EOFError):
        return None
    out = []
    for split in ("train", "test"):
        X, y = arrays[(split, "images")], arrays[(split, "labels")]
        if X.dtype != np.uint8 or X.shape[1:] != IMAGE_SHAPE or y.dtype != np.int64 or y.shape != X.shape[:1] \
                or len(y) == 0 or y.min() < 0 or y.max() >= NUM_CLASSES:
            return None
        out += [np.asarray(X), np.array(y)]  # images: a plain ndarray view of the map; labels: a small copy
    return tuple(out)


def _save_atomic(path, arr):
    """np.save arr to path through a temporary file and os.replace, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(cdir, key, arrays):
    """Write (Xtr, ytr, Xte, yte) as the cache of key, then delete stale caches of the same folder."""
    Xtr, ytr, Xte, yte = arrays
    values = {("train", "images"): Xtr, ("train", "labels"): ytr, ("test", "images"): Xte, ("test", "labels"): yte}
    paths = _cache_paths(cdir, key)
    for k, path in paths.items():  # labels before images, per split
        _save_atomic(path, values[k])
    for old in cdir.glob(f"cifar10-{key[0]}-*.npy"):
        if old not in paths.values():
            old.unlink(missing_ok=True)


def _load_cached(root, cdir):
    """The four arrays from the cache in cdir, building it first if missing, stale or corrupt."""
    key = _cache_key(root)
    arrays = _read_cache(cdir, key)
    if arrays is not None:
        return arrays
    try:
        cdir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported by the write below
    with _dir_lock(cdir):
        arrays = _read_cache(cdir, key)  # another process may have built it while we waited
        if arrays is not None:
            return arrays
        arrays = _load_batches(root)
        try:
            _write_cache(cdir, key, arrays)
        except OSError as err:
            warnings.warn(f"cannot write the CIFAR-10 image cache in {cdir} ({type(err).__name__}: {err}); keeping "
                          f"the images in this process's memory. Set {CACHE_DIR_ENV} to a writable folder, or pass "
                          f"cache=False to silence this.", DataCacheWarning, stacklevel=3)
            return arrays
    return _read_cache(cdir, key) or arrays


def _batches_dir(root):
    """The folder holding the batch files, given it or the folder that holds it."""
    return find_data_dir(root)


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
    root = _batches_dir(root)
    if cache is False:
        return _load_batches(root)
    return _load_cached(root, cache_dir() if cache is True else Path(cache).expanduser())


def _check_float_dtype(dtype, argname="dtype"):
    """np.dtype(dtype), which must be a floating point type; ValueError naming argname otherwise."""
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"{argname} must be a floating point dtype (e.g. np.float64, np.float32), got {dt}")
    return dt


def load_CIFAR10(root, dtype=np.float64, cache=True):
    """Load all of CIFAR-10 as floating point images (no preprocessing), as in CS231n but channels first.

    Inputs: root: the cifar-10-batches-py folder or the folder holding it; dtype: floating dtype of the images;
    cache: as in load_CIFAR10_raw.
    Returns a tuple of Xtr (50000, 3, 32, 32), Ytr int64 (50000,), Xte (10000, 3, 32, 32), Yte int64 (10000,).
    """
    dtype = _check_float_dtype(dtype)
    Xtr, ytr, Xte, yte = load_CIFAR10_raw(root, cache=cache)
    return Xtr.astype(dtype), ytr, Xte.astype(dtype), yte


# ---------------------------------------------------------------------------------------------- lazy images
class ImageArray:
    """Images kept as uint8 and converted to floating point (mean image subtracted) only when rows are taken.

    Holds raw: uint8 (N, 3, 32, 32) (read-only; may be memory-mapped), a float64 mean image (3, 32, 32) and a target
    dtype. Looks like the float array X = (raw - mean_image).astype(dtype) of shape (N, 3, 32, 32):
    - X[i], X[int_array], X[bool_mask], X[list]: a new ndarray of just those rows, converted;
    - X[a:b:c] (a slice of rows): another ImageArray, a view of the same uint8 memory (nothing is converted), so
      data['X_train'][:50] stays lazy; np.asarray(X[a:b]) converts it;
    - X[rows, ...] (a tuple): an ndarray, exactly as numpy would index the converted array;
    - np.asarray(X) / np.array(X): the whole array, converted in chunks (no float64 scratch copy of all of it);
    - X.astype(dtype): an ImageArray sharing raw that converts to dtype instead.
    Every value is computed as float64 (raw - mean_image) rounded once to dtype, so it is the same bit for bit
    whichever way it is obtained (the eager path of get_CIFAR10_data materializes this class).
    """

    def __init__(self, raw, mean_image=None, dtype=np.float64):
        """raw: uint8 (N, *image_shape); mean_image: (*image_shape) (None: zeros), kept as float64; dtype: float."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim < 2:
            raise ValueError(f"raw must be a uint8 array of shape (N, ...), got {raw.dtype} {raw.shape}")
        mean = np.zeros(raw.shape[1:]) if mean_image is None else np.asarray(mean_image, dtype=np.float64)
        if mean.shape != raw.shape[1:]:
            raise ValueError(f"mean_image must have shape {raw.shape[1:]} (an image), got {mean.shape}")
        if mean.flags.writeable:  # our own read-only copy, shared by the views made by slicing
            mean = mean.copy()
            mean.flags.writeable = False
        self._raw = raw.view()
        self._raw.flags.writeable = False
        self._mean = mean
        self._dtype = _check_float_dtype(dtype)

    raw = property(lambda self: self._raw, doc="the uint8 images, (N, 3, 32, 32), read-only")
    mean_image = property(lambda self: self._mean, doc="the float64 image subtracted from every image, (3, 32, 32)")
    dtype = property(lambda self: self._dtype, doc="dtype of the converted values")
    shape = property(lambda self: self._raw.shape, doc="(N, 3, 32, 32)")
    ndim = property(lambda self: self._raw.ndim)
    size = property(lambda self: self._raw.size)

    def __len__(self):
        return len(self._raw)

    def __repr__(self):
        return f"ImageArray(shape={self.shape}, dtype={self.dtype}, raw=uint8)"

    def astype(self, dtype, copy=True):
        """An ImageArray over the same uint8 memory that converts to dtype (copy is accepted for numpy's sake)."""
        return ImageArray(self._raw, self._mean, dtype)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return ImageArray(self._raw[idx], self._mean, self._dtype)
        if isinstance(idx, tuple):
            return self._take_elements(idx)
        return self._convert(self._raw[idx])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("an ImageArray cannot be converted to an ndarray without a copy")
        if dtype is None or np.dtype(dtype).kind == "f":
            return (self if dtype is None else self.astype(dtype))._convert(self._raw)
        return self._convert(self._raw).astype(dtype)

    def _take_elements(self, idx):
        """X[idx] for a tuple idx (rows and more): index raw and the broadcast mean alike, then convert."""
        mean = np.broadcast_to(self._mean, self._raw.shape)[idx]
        return np.subtract(self._raw[idx], mean, dtype=np.float64).astype(self._dtype)

    def _convert(self, rows):
        """(rows - mean_image) as an ndarray of self.dtype; rows: uint8 (*lead, 3, 32, 32)."""
        out = np.empty(rows.shape, dtype=self._dtype)
        if rows.ndim <= self._mean.ndim or rows.size == 0:
            _subtract_into(rows, self._mean, out)
            return out
        step = max(1, _CHUNK_BYTES // (8 * rows[0].size))
        for start in range(0, len(rows), step):
            _subtract_into(rows[start:start + step], self._mean, out[start:start + step])
        return out


def _subtract_into(rows, mean, out):
    """out[...] = float64(rows) - mean, rounded to out.dtype."""
    if out.dtype == np.float64:
        np.subtract(rows, mean, out=out)
    else:
        out[...] = np.subtract(rows, mean, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ the splits
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
    dtype = _check_float_dtype(dtype)
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
