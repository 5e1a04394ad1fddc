"""Download the CIFAR-10 python archive, verify its MD5 and extract it safely; nothing else.

``download_CIFAR10(dest_dir)`` fetches the archive (from the ``url`` argument, else ``$DPNET_CIFAR10_URL``, else the
official URL) into a temporary file in dest_dir, reading no more than ``max_bytes`` (DOWNLOAD_LIMIT, a little more
than the official archive's size), checks its MD5 (``ChecksumError``), checks that every member is a plain file or
folder inside ``cifar-10-batches-py/`` and that they add up to at most EXTRACT_LIMIT bytes (``ArchiveError``), and
extracts it into a temporary folder there that is renamed into place only once it holds every batch. Network
failures raise ``DownloadError``, whose text says how to get the data by hand. Nothing partial is left behind, and
processes downloading into one folder take turns.

This module is imported only when needed (by ``locate.locate_CIFAR10`` when it must download, by ``dpnet.data_utils``
on first access to one of its names), so the HTTP, URL and tar modules stay out of every process that finds the data.
"""

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from .layout import CIFAR10_FOLDER, DATA_DIR_ENV, missing_files
from .lock import dir_lock

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV = "DPNET_CIFAR10_URL"
DOWNLOAD_LIMIT = 200 << 20  # bytes a download may bring, whatever the server says (the official archive: 170498071)
EXTRACT_LIMIT = 400 << 20  # bytes the archive's members may add up to (the official ones: 186 MB)


class ChecksumError(ValueError):
    """A downloaded archive does not have the expected MD5."""


class ArchiveError(ValueError):
    """A downloaded archive is corrupt, unsafe to extract, or lacks the CIFAR-10 batches."""


class DownloadError(OSError):
    """The archive could not be downloaded (network error, HTTP error, interrupted transfer)."""


def download_CIFAR10(dest_dir, url=None, md5=None, progress=None, max_bytes=DOWNLOAD_LIMIT):
    """Download the CIFAR-10 python archive, verify its MD5 and extract it as dest_dir/cifar-10-batches-py.

    The archive goes to a temporary file in dest_dir and the batches to a temporary folder there; only a verified,
    complete folder is renamed into place, and the temporary files are removed whatever happens. Processes that
    download into the same dest_dir at once take turns; the later ones find the data and download nothing.
    Inputs: dest_dir: the folder to extract into (created if missing); url: the archive's URL (None:
    $DPNET_CIFAR10_URL, else CIFAR10_URL); md5: its expected MD5 hex digest (None: CIFAR10_MD5, the official
    archive's); progress: show a progress bar (None: only when stderr is a terminal); max_bytes: the most the
    download may bring (a server announcing more is refused before the transfer, one sending more is cut off).
    Returns the Path of dest_dir/cifar-10-batches-py.
    Raises DownloadError (network, or more than max_bytes), ChecksumError (MD5 mismatch) or ArchiveError (corrupt or
    unsafe archive).
    """
    dest_dir = Path(dest_dir).expanduser()
    url = url or os.environ.get(URL_ENV) or CIFAR10_URL
    md5 = CIFAR10_MD5 if md5 is None else md5
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / CIFAR10_FOLDER
    with dir_lock(dest_dir):
        if not missing_files(target):
            return target
        archive = _fetch(url, dest_dir, md5, progress, max_bytes)
        try:
            _extract(archive, dest_dir)
        finally:
            archive.unlink(missing_ok=True)
    return target


def _fetch(url, dest_dir, md5, progress, max_bytes):
    """Download url into a temporary file in dest_dir and check its MD5; returns the file's Path."""
    fd, tmp = tempfile.mkstemp(prefix=".cifar-10-python.", suffix=".tar.gz.part", dir=dest_dir)
    ok = False
    try:
        with os.fdopen(fd, "wb") as f:
            digest = _copy_url(url, f, dest_dir, progress, max_bytes)
        if digest != md5.lower():
            raise ChecksumError(f"the archive downloaded from {url} has MD5 {digest}, expected {md5.lower()}: it is "
                                f"corrupt or not the CIFAR-10 python archive (it was deleted)")
        ok = True
        return Path(tmp)
    finally:
        if not ok:
            Path(tmp).unlink(missing_ok=True)


def _copy_url(url, f, dest_dir, progress, max_bytes=DOWNLOAD_LIMIT):
    """Copy the body at url into the open file f with a progress bar, refusing more than max_bytes; returns its MD5
    hex digest."""
    from tqdm import tqdm

    md5, received, total = hashlib.md5(usedforsecurity=False), 0, None
    disable = not sys.stderr.isatty() if progress is None else not progress
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            if total is not None and total > max_bytes:
                raise DownloadError(_by_hand(url, dest_dir, f"the server offers {total} bytes, more than the "
                                                            f"{max_bytes} a CIFAR-10 archive may have"))
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="CIFAR-10",
                      disable=disable) as bar:
                while chunk := resp.read(min(1 << 20, max_bytes + 1 - received)):
                    if received + len(chunk) > max_bytes:
                        raise DownloadError(_by_hand(url, dest_dir, f"the transfer went past {max_bytes} bytes, "
                                                                    "more than a CIFAR-10 archive may have"))
                    f.write(chunk)
                    md5.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        if isinstance(err, urllib.error.HTTPError):
            err.close()  # it holds the response open
        raise DownloadError(_by_hand(url, dest_dir, f"{type(err).__name__}: {err}")) from err
    if total is not None and received != total:
        raise DownloadError(_by_hand(url, dest_dir, f"the transfer stopped after {received} of {total} bytes"))
    return md5.hexdigest()


def _by_hand(url, dest_dir, reason):
    """The text of DownloadError: what failed and how to get the data by hand."""
    return (f"could not download CIFAR-10 from {url} ({reason}).\nTo get it by hand: download {CIFAR10_URL} "
            f"(MD5 {CIFAR10_MD5}) on a machine with internet access, extract it with "
            f"'tar xzf cifar-10-python.tar.gz' into {dest_dir} (so that {dest_dir / CIFAR10_FOLDER / 'data_batch_1'} "
            f"exists), or anywhere and set {DATA_DIR_ENV} to the folder holding {CIFAR10_FOLDER}. "
            f"{URL_ENV} sets another URL to download from (e.g. a local mirror or a file:// URL).")


def _check_member(member, archive):
    """Reject tar members that are not plain files/folders under cifar-10-batches-py/ or that escape it."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != CIFAR10_FOLDER \
            or "\\" in member.name:
        raise ArchiveError(f"{archive}: refusing to extract '{member.name}': every member must be inside "
                           f"{CIFAR10_FOLDER}/ with no absolute path and no '..'")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"{archive}: refusing to extract '{member.name}': only regular files and folders "
                           f"are allowed (it is a link or device)")


def _extract(archive, dest_dir):
    """Extract a verified archive into a temporary folder in dest_dir, check it, and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-10-extract.", dir=dest_dir))
    try:
        _safe_extract(archive, tmp)
        missing = missing_files(tmp / CIFAR10_FOLDER)
        if missing:
            raise ArchiveError(f"{archive}: the archive lacks {CIFAR10_FOLDER}/{', '.join(missing)}")
        try:
            os.rename(tmp / CIFAR10_FOLDER, dest_dir / CIFAR10_FOLDER)
        except OSError:
            if missing_files(dest_dir / CIFAR10_FOLDER):  # not someone else's complete copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_extract(archive, folder):
    """Check every member of a .tar.gz, then extract them into folder (with tarfile's 'data' filter)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            total = sum(member.size for member in members if member.isfile())
            if total > EXTRACT_LIMIT:
                raise ArchiveError(f"{archive}: refusing to extract {total} bytes, more than the {EXTRACT_LIMIT} the "
                                   f"CIFAR-10 batches may take")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(folder, members=members, filter="data")
            else:  # Python < 3.11.4: the checks above are the filter
                tar.extractall(folder, members=members)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArchiveError(f"{archive}: cannot extract the archive ({type(err).__name__}: {err})") from err
