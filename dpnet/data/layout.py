"""The official CIFAR-10 python layout, the environment variables naming dpnet's folders, and its cache root.

The data is a folder ``cifar-10-batches-py`` holding the pickled batches ``data_batch_1`` .. ``data_batch_5``
(10000 training images each), ``test_batch`` (10000 test images) and ``batches.meta``. Each batch is a dict
``{b'data': uint8 (10000, 3072), b'labels': [int in 0..9] * 10000, ...}``; a row of ``data`` is one 32x32 image stored
channel by channel (1024 red, 1024 green, 1024 blue values), so it reshapes to (3, 32, 32) without copying. dpnet
keeps images channels first, X: (N, 3, 32, 32).
"""

import os
from pathlib import Path

CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
REQUIRED_FILES = TRAIN_FILES + (TEST_FILE,)
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10

DATA_DIR_ENV = "DPNET_DATA_DIR"
CACHE_DIR_ENV = "DPNET_CACHE_DIR"


def missing_files(folder):
    """Names of the required batch files that folder (a Path) lacks: all of them if it does not exist."""
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def user_cache_root():
    """Per-user cache root: $XDG_CACHE_HOME/dpnet if XDG_CACHE_HOME is an absolute path, else ~/.cache/dpnet."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dpnet"
