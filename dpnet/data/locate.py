"""Where CIFAR-10 is looked for, and finding it there (having it downloaded when it is missing).

The data directory is the ``data_dir`` argument, else ``$DPNET_DATA_DIR``, else ``default_data_dir()``
(``~/.cache/dpnet/data``, under ``$XDG_CACHE_HOME`` when it is set). It may name the ``cifar-10-batches-py`` folder
itself or the folder that holds it. ``locate_CIFAR10`` imports ``dpnet.data.download`` only when it must download.
"""

import os
from pathlib import Path

from .layout import CIFAR10_FOLDER, DATA_DIR_ENV, REQUIRED_FILES, missing_files, user_cache_root


class CIFAR10NotFoundError(FileNotFoundError):
    """The CIFAR-10 batches are not where they were looked for."""

    incomplete = None  # the folder holding only some of the batch files, if any


def default_data_dir():
    """Where CIFAR-10 is looked for (and downloaded to) when neither data_dir nor $DPNET_DATA_DIR is given."""
    return user_cache_root() / "data"


def _chosen_data_dir(data_dir):
    """The data directory by precedence and where it came from: (Path, description)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser(), f"the environment variable {DATA_DIR_ENV}"
    return default_data_dir(), f"the default (neither data_dir nor {DATA_DIR_ENV} was given)"


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
        if not missing_files(folder):
            return folder
    partial = next((f for f in _candidates(base) if len(missing_files(f)) < len(REQUIRED_FILES)), None)
    err = CIFAR10NotFoundError(_not_found_message(base, source, partial))
    err.incomplete = partial
    raise err


def _not_found_message(base, source, partial):
    """The text of CIFAR10NotFoundError: where we looked, why there, and how to fix it."""
    looked = "\n".join(f"  {folder}" for folder in _candidates(base))
    msg = (f"CIFAR-10 not found: looked for {', '.join(REQUIRED_FILES)} in\n{looked}\n"
           f"(the data directory {base} comes from {source}).")
    if partial is not None:
        msg += (f"\n{partial} is incomplete: it lacks {', '.join(missing_files(partial))}. Remove it and download "
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
