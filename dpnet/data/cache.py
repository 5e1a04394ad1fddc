"""The per-user cache of the raw uint8 images, as .npy files opened memory-mapped.

The images and labels of both splits are kept in ``$DPNET_CACHE_DIR``, else ``~/.cache/dpnet`` (under
``$XDG_CACHE_HOME`` when set), as ``cifar10-<folder>-<content>-<split>-<part>.npy``: <folder> hashes the batches
folder's resolved path, <content> the format and the batch files' sizes and modification times. They are opened with
``np.load(mmap_mode='r')``, so every process on one machine reads the same pages of the page cache instead of holding
its own copy. Files are written atomically, by one process at a time, and rebuilt when stale or corrupt.
"""

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .layout import CACHE_DIR_ENV, IMAGE_SHAPE, NUM_CLASSES, REQUIRED_FILES, user_cache_root
from .lock import dir_lock
from .unpickle import load_batches

_CACHE_FORMAT = 1  # bump to invalidate every existing cache file


class DataCacheWarning(UserWarning):
    """The image cache could not be written; the images are kept in memory instead."""


def cache_dir():
    """Folder of the uint8 image cache: $DPNET_CACHE_DIR, else the per-user cache root (~/.cache/dpnet)."""
    env = os.environ.get(CACHE_DIR_ENV, "")
    return Path(env).expanduser() if env else user_cache_root()


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


def save_atomic(path, arr):
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
        save_atomic(path, values[k])
    for old in cdir.glob(f"cifar10-{key[0]}-*.npy"):
        if old not in paths.values():
            old.unlink(missing_ok=True)


def load_cached(root, cdir):
    """The batches of folder root from the cache in folder cdir, building it first if missing, stale or corrupt.

    Returns (Xtr, ytr, Xte, yte) as load_batches does, the images read-only and memory-mapped; if the cache cannot be
    written, a DataCacheWarning (pointing at the caller's caller) is issued and the arrays read are returned.
    """
    key = _cache_key(root)
    arrays = _read_cache(cdir, key)
    if arrays is not None:
        return arrays
    try:
        cdir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported by the write below
    with dir_lock(cdir):
        arrays = _read_cache(cdir, key)  # another process may have built it while we waited
        if arrays is not None:
            return arrays
        arrays = load_batches(root)
        try:
            _write_cache(cdir, key, arrays)
        except OSError as err:
            warnings.warn(f"cannot write the CIFAR-10 image cache in {cdir} ({type(err).__name__}: {err}); keeping "
                          f"the images in this process's memory. Set {CACHE_DIR_ENV} to a writable folder, or pass "
                          f"cache=False to silence this.", DataCacheWarning, stacklevel=3)
            return arrays
    return _read_cache(cdir, key) or arrays
