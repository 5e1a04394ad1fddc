"""CIFAR-10 for the assignment: locate it, load it safely, cache it, split and preprocess it (``get_CIFAR10_data``).

This is the seed's data API; the work is done in the ``dpnet.data`` package, whose public names are re-exported here.
Images are channels first, X: (N, 3, 32, 32), labels int64 in 0..9.

The download's names (``download_CIFAR10``, ``ChecksumError``, ``ArchiveError``, ``DownloadError``, ``CIFAR10_URL``,
``CIFAR10_MD5``, ``URL_ENV``) are reachable here too, but ``dpnet.data.download`` is imported only on their first
access or when ``locate_CIFAR10`` must download: a process that finds the data never imports ``http.client``,
``urllib.request`` or ``tarfile``.
"""

from .data.cache import DataCacheWarning, cache_dir
from .data.cifar10 import get_CIFAR10_data, load_CIFAR10, load_CIFAR10_raw
from .data.images import ImageArray
from .data.layout import (CACHE_DIR_ENV, CIFAR10_FOLDER, DATA_DIR_ENV, IMAGE_SHAPE, NUM_CLASSES, REQUIRED_FILES,
                          TEST_FILE, TRAIN_FILES)
from .data.locate import CIFAR10NotFoundError, default_data_dir, find_data_dir, locate_CIFAR10
from .data.unpickle import BatchFormatError, UnsafePickleError, load_CIFAR_batch

__all__ = ["CACHE_DIR_ENV", "CIFAR10_FOLDER", "DATA_DIR_ENV", "IMAGE_SHAPE", "NUM_CLASSES", "REQUIRED_FILES",
           "TEST_FILE", "TRAIN_FILES", "BatchFormatError", "CIFAR10NotFoundError", "DataCacheWarning",
           "UnsafePickleError", "ImageArray", "cache_dir", "default_data_dir", "find_data_dir", "get_CIFAR10_data",
           "load_CIFAR10", "load_CIFAR10_raw", "load_CIFAR_batch", "locate_CIFAR10"]

_DOWNLOAD_NAMES = frozenset({"download_CIFAR10", "ChecksumError", "ArchiveError", "DownloadError", "CIFAR10_URL",
                             "CIFAR10_MD5", "URL_ENV"})


def __getattr__(name):
    """The download's names, imported from dpnet.data.download on first access (PEP 562).

    So ``import dpnet.data_utils`` does not import the download, and data_utils.ChecksumError is the class object
    dpnet.data.download.ChecksumError.
    """
    if name in _DOWNLOAD_NAMES:
        from .data import download
        return getattr(download, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _DOWNLOAD_NAMES)
