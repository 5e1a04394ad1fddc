"""Tests of dpnet.data_utils (the dpnet.data package behind it): safe loading, splits, lazy images, the image cache,
locating and downloading (the download is dpnet.data.download's, reached through data_utils as users reach it).

Most tests use a small fake CIFAR-10 (a few random images per batch, pickled like the official files) written into
tmp_path. Tests of the real data take its location from $DPNET_TEST_DATA_DIR (fixture cifar10_dir in conftest.py).
Every test runs with $DPNET_CACHE_DIR and $XDG_CACHE_HOME inside its tmp_path, so nothing is written to $HOME.
"""

import hashlib
import http.server
import io
import mmap
import os
import pickle
import shlex
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings

import numpy as np
import pytest

from dpnet import data_utils as du
from dpnet.data.layout import missing_files

N_PER_BATCH = 6  # images per fake training batch: 30 training images in all
N_TEST = 8
KEYS = ["X_train", "y_train", "X_val", "y_val", "X_test", "y_test"]


# ------------------------------------------------------------------------------------------------ fake data
def pickle_like_official(obj):
    """Pickle obj as the official batches are: naming numpy.core.multiarray._reconstruct (numpy 1's path)."""
    data = pickle.dumps(obj, protocol=3)  # protocol 2 would pickle bytes through _codecs.encode
    return data.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def fake_batch(rng, n, name):
    """A batch dict as in the official files: uint8 data (n, 3072), a list of labels, a label and file names."""
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}


def make_fake_cifar(folder, seed=0):
    """Write a fake cifar-10-batches-py into folder; returns the expected (Xtr, ytr, Xte, yte)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = [fake_batch(rng, N_PER_BATCH, f"data_batch_{i}") for i in range(1, 6)]
    batches.append(fake_batch(rng, N_TEST, "test_batch"))
    for name, batch in zip(du.REQUIRED_FILES, batches):
        (folder / name).write_bytes(pickle_like_official(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"] * 10}, protocol=2))
    X = [b[b"data"].reshape(-1, 3, 32, 32) for b in batches]
    y = [np.array(b[b"labels"], dtype=np.int64) for b in batches]
    return np.concatenate(X[:5]), np.concatenate(y[:5]), X[5], y[5]


def tar_gz(members):
    """A .tar.gz in memory from [(TarInfo, bytes or None)]; returns (bytes, md5 hex)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    data = buf.getvalue()
    return data, hashlib.md5(data).hexdigest()


def folder_members(folder, arcname=du.CIFAR10_FOLDER):
    """Tar members of a folder and its files, as (TarInfo, bytes or None)."""
    info = tarfile.TarInfo(arcname)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    members = [(info, None)]
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        info = tarfile.TarInfo(f"{arcname}/{path.name}")
        info.size, info.mode = len(data), 0o644
        members.append((info, data))
    return members


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Keep caches and downloads inside tmp_path and the user's settings out of the tests."""
    monkeypatch.setenv(du.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(du.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(du.URL_ENV, raising=False)


@pytest.fixture
def fake(tmp_path):
    """(the fake cifar-10-batches-py folder, expected (Xtr, ytr, Xte, yte))."""
    root = tmp_path / "data" / du.CIFAR10_FOLDER
    return root, make_fake_cifar(root)


@pytest.fixture
def archive(tmp_path):
    """A fake official archive: (bytes, md5, expected arrays)."""
    expected = make_fake_cifar(tmp_path / "src")
    data, md5 = tar_gz(folder_members(tmp_path / "src"))
    return data, md5, expected


class _Served:
    """What the loopback server serves: files {path: bytes}, paths to cut short, requests seen, and a delay."""

    def __init__(self):
        self.files, self.cut, self.requests, self.delay, self.port = {}, set(), [], 0.0, None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 (a free port) in a thread; paths in .cut send half the body and hang up."""
    served = _Served()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.requests.append(self.path)
            time.sleep(served.delay)
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2] if self.path in served.cut else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def is_memory_mapped(a):
    """Whether the memory of ndarray a comes from a memory map."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


# ----------------------------------------------------------------------------------------------- safe loading
def test_load_CIFAR_batch_shapes_and_values(fake):
    root, (Xtr, ytr, Xte, yte) = fake
    X, y = du.load_CIFAR_batch(root / "data_batch_2")
    assert X.dtype == np.uint8 and X.shape == (N_PER_BATCH, 3, 32, 32)
    assert y.dtype == np.int64 and y.shape == (N_PER_BATCH,)
    np.testing.assert_array_equal(X, Xtr[N_PER_BATCH:2 * N_PER_BATCH])
    np.testing.assert_array_equal(y, ytr[N_PER_BATCH:2 * N_PER_BATCH])


def test_fake_batches_name_the_numpy_1_path_and_load_without_warnings(fake):
    root, _ = fake
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in (root / "test_batch").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy 2's DeprecationWarning for numpy.core
        X, _ = du.load_CIFAR_batch(root / "test_batch")
    assert X.shape == (N_TEST, 3, 32, 32)


class _RunsShell:
    """Unpickling this runs a shell command (as a crafted 'batch' would)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unsafe_pickle_is_rejected_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _RunsShell(f"touch {shlex.quote(str(marker))}"), b"labels": [0]}, protocol=3)
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(du.UnsafePickleError) as info:
        du.load_CIFAR_batch(path)
    assert str(path) in str(info.value) and ".system" in str(info.value)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"cnumpy\nload\n.",
    b"cnumpy.core.multiarray\nscalar\n.",
    b"cnumpy.lib.format\nread_array\n.",
    pickle.dumps(os.system, protocol=4),  # STACK_GLOBAL
], ids=["builtins.eval", "numpy.load", "numpy.core.multiarray.scalar", "numpy.lib.format", "stack_global"])
def test_only_the_official_globals_are_admitted(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(payload)
    with pytest.raises(du.UnsafePickleError, match="refusing to unpickle"):
        du.load_CIFAR_batch(path)


def test_truncated_batch_names_the_file(fake, tmp_path):
    root, _ = fake
    path = tmp_path / "data_batch_1"
    path.write_bytes((root / "data_batch_1").read_bytes()[:9000])
    with pytest.raises(du.BatchFormatError, match="data_batch_1"):
        du.load_CIFAR_batch(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(du.BatchFormatError, match="garbage"):
        du.load_CIFAR_batch(path)


def _good_batch():
    return {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 9]}


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update({b"data": np.zeros((4, 3000), np.uint8)}), "3072"),
    (lambda b: b.update({b"data": np.zeros((4, 3072), np.float32)}), "uint8"),
    (lambda b: b.update({b"data": np.zeros(4 * 3072, np.uint8)}), "uint8 array of shape"),
    (lambda b: b.update({b"data": [[0] * 3072] * 4}), "uint8 array of shape"),
    (lambda b: b.update({b"labels": [0, 1, 2]}), "4 integers"),
    (lambda b: b.update({b"labels": [0, 1, 2, 10]}), "0..9"),
    (lambda b: b.update({b"labels": [0, -1, 2, 3]}), "0..9"),
    (lambda b: b.update({b"labels": [0.0, 1.0, 2.0, 3.0]}), "integers"),
    (lambda b: b.pop(b"labels"), "labels"),
], ids=["width", "dtype", "flat", "list", "count", "above", "negative", "floats", "missing"])
def test_malformed_batch_names_the_file(tmp_path, change, message):
    batch = _good_batch()
    change(batch)
    path = tmp_path / "data_batch_3"
    path.write_bytes(pickle.dumps(batch, protocol=3))
    with pytest.raises(du.BatchFormatError, match=message) as info:
        du.load_CIFAR_batch(path)
    assert str(path) in str(info.value)


def test_batch_that_is_not_a_dict(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(du.BatchFormatError, match="expected a dict"):
        du.load_CIFAR_batch(path)


# ------------------------------------------------------------------------------------------------- location
def test_find_data_dir_takes_the_folder_or_its_parent(fake):
    root, _ = fake
    assert du.find_data_dir(root) == root
    assert du.find_data_dir(root.parent) == root
    assert du.find_data_dir(str(root.parent)) == root


def test_find_data_dir_from_the_environment_and_argument_first(fake, tmp_path, monkeypatch):
    root, _ = fake
    monkeypatch.setenv(du.DATA_DIR_ENV, str(root.parent))
    assert du.find_data_dir() == root
    other = tmp_path / "other" / du.CIFAR10_FOLDER
    make_fake_cifar(other, seed=1)
    assert du.find_data_dir(other) == other


def test_find_data_dir_default_is_the_user_cache(tmp_path):
    root = tmp_path / "xdg" / "dpnet" / "data" / du.CIFAR10_FOLDER  # XDG_CACHE_HOME is tmp_path/xdg
    make_fake_cifar(root)
    assert du.default_data_dir() == root.parent
    assert du.find_data_dir() == root


def test_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(du.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(du.CIFAR10NotFoundError) as info:
        du.find_data_dir()
    text = str(info.value)
    assert str(tmp_path / "nowhere") in text and str(tmp_path / "nowhere" / du.CIFAR10_FOLDER) in text
    assert du.DATA_DIR_ENV in text and "data_batch_1" in text


def test_incomplete_folder_is_reported_not_downloaded_over(fake, server):
    root, _ = fake
    (root / "test_batch").unlink()
    with pytest.raises(du.CIFAR10NotFoundError, match="incomplete.*test_batch"):
        du.locate_CIFAR10(root.parent, url=server.url("/x.tar.gz"))
    assert server.requests == []


# -------------------------------------------------------------------------------------- get_CIFAR10_data
def test_get_CIFAR10_data_splits_as_cs231n(fake):
    root, (Xtr, ytr, Xte, yte) = fake
    data = du.get_CIFAR10_data(20, 7, 5, data_dir=root, download=False)
    assert list(data) == KEYS
    mean = Xtr[:20].astype(np.float64).mean(axis=0)
    expected = {"X_train": Xtr[:20] - mean, "y_train": ytr[:20], "X_val": Xtr[20:27] - mean, "y_val": ytr[20:27],
                "X_test": Xte[:5] - mean, "y_test": yte[:5]}
    for key in KEYS:
        assert type(data[key]) is np.ndarray and data[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(data[key], expected[key])  # bit for bit
    assert data["y_train"].dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lazy_equals_eager_bit_for_bit(fake, dtype):
    root, _ = fake
    eager = du.get_CIFAR10_data(20, 7, 5, data_dir=root, dtype=dtype, download=False)
    lazy = du.get_CIFAR10_data(20, 7, 5, data_dir=root, dtype=dtype, lazy=True, download=False)
    assert list(lazy) == KEYS
    X, E = lazy["X_train"], eager["X_train"]
    assert isinstance(X, du.ImageArray) and E.dtype == dtype
    mask = np.arange(20) % 3 == 0
    for idx in [0, -1, 7, slice(2, 9), slice(None, None, -3), np.array([5, 1, 5, 19]), [3, 4], mask,
                (slice(None), 1), (np.array([0, 2]), 2, slice(4, 9)), (5, 0, 3, 3), (Ellipsis, 0)]:
        got = np.asarray(X[idx])
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, E[idx], err_msg=str(idx))
    for key in ("X_val", "X_test"):
        assert np.array_equal(np.asarray(lazy[key]), eager[key])
    expected = (X.raw.astype(np.float64) - X.mean_image).astype(dtype)
    assert np.array_equal(E, expected)


def test_no_mean_subtraction(fake):
    root, (Xtr, _, Xte, _) = fake
    data = du.get_CIFAR10_data(20, 7, 5, subtract_mean=False, data_dir=root, dtype=np.float32, lazy=True)
    np.testing.assert_array_equal(np.asarray(data["X_train"]), Xtr[:20].astype(np.float32))
    np.testing.assert_array_equal(data["X_test"][[0, 4]], Xte[[0, 4]].astype(np.float32))
    assert not data["X_val"].mean_image.any()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_training=0), ValueError, "num_training must be >= 1"),
    (dict(num_validation=-1), ValueError, "num_validation"),
    (dict(num_test=-2), ValueError, "num_test"),
    (dict(num_training=25, num_validation=6), ValueError, "num_training \\+ num_validation.*30 training"),
    (dict(num_test=9), ValueError, "num_test = 9 exceeds the 8 test"),
    (dict(num_training=1.5), TypeError, "num_training must be an integer"),
    (dict(num_training=True), TypeError, "num_training"),
    (dict(dtype=np.int32), ValueError, "dtype must be a floating"),
])
def test_bad_arguments_are_named(fake, kwargs, error, message):
    root, _ = fake
    args = dict(num_training=20, num_validation=7, num_test=5, data_dir=root, download=False) | kwargs
    with pytest.raises(error, match=message):
        du.get_CIFAR10_data(**args)


def test_load_CIFAR10_classic_api(fake):
    root, (Xtr, ytr, Xte, yte) = fake
    Xtr2, ytr2, Xte2, yte2 = du.load_CIFAR10(root, dtype=np.float32)
    assert Xtr2.dtype == np.float32 and Xtr2.shape == (5 * N_PER_BATCH, 3, 32, 32)
    np.testing.assert_array_equal(Xtr2, Xtr)
    np.testing.assert_array_equal(Xte2, Xte)
    assert ytr2.dtype == np.int64 and np.array_equal(ytr2, ytr) and np.array_equal(yte2, yte)


# ---------------------------------------------------------------------------------------------- ImageArray
def test_image_array_looks_like_an_array():
    raw = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    mean = raw.mean(axis=0)
    X = du.ImageArray(raw, mean, np.float32)
    assert X.shape == (10, 3, 32, 32) and X.ndim == 4 and len(X) == 10 and X.size == raw.size
    assert X.dtype == np.float32 and X.mean_image.dtype == np.float64
    assert np.array_equal(X.mean_image, mean) and np.shares_memory(X.raw, raw)
    assert not X.raw.flags.writeable and not X.mean_image.flags.writeable
    assert np.array_equal(np.asarray(X), (raw - mean).astype(np.float32))
    assert np.asarray(X, dtype=np.float64).dtype == np.float64
    assert [x.shape for x in X] == [(3, 32, 32)] * 10
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(X, copy=False)
    with pytest.raises(IndexError):
        X[10]


def test_image_array_slices_are_lazy_views():
    raw = np.arange(6 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(6, 3, 32, 32)
    X = du.ImageArray(raw, raw.mean(axis=0))
    part = X[1:5]
    assert isinstance(part, du.ImageArray) and part.shape == (4, 3, 32, 32)
    assert np.shares_memory(part.raw, raw) and part.mean_image is X.mean_image
    np.testing.assert_array_equal(np.asarray(part), np.asarray(X)[1:5])
    np.testing.assert_array_equal(part[[0, 3]], np.asarray(X)[[1, 4]])
    assert isinstance(X[::2], du.ImageArray) and len(X[::2]) == 3


def test_image_array_astype_shares_the_images():
    raw = np.ones((3, 3, 32, 32), np.uint8)
    X = du.ImageArray(raw)
    Y = X.astype(np.float16)
    assert isinstance(Y, du.ImageArray) and Y.dtype == np.float16 and np.shares_memory(Y.raw, X.raw)
    assert Y[0].dtype == np.float16 and X[0].dtype == np.float64


def test_image_array_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        du.ImageArray(np.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="mean_image"):
        du.ImageArray(np.zeros((2, 3, 32, 32), np.uint8), np.zeros((3, 32)))


# ---------------------------------------------------------------------------------------------- the cache
def cache_files(folder):
    return sorted(p.name for p in folder.glob("*.npy"))


def test_cache_is_written_then_memory_mapped(fake, tmp_path):
    root, (Xtr, ytr, Xte, yte) = fake
    first = du.load_CIFAR10_raw(root)
    files = cache_files(tmp_path / "cache")
    assert len(files) == 4 and not list((tmp_path / "cache").glob(".*"))  # no temporary files left
    second = du.load_CIFAR10_raw(root)
    for got in (first, second):
        for a, b in zip(got, (Xtr, ytr, Xte, yte)):
            np.testing.assert_array_equal(a, b)
        assert is_memory_mapped(got[0]) and is_memory_mapped(got[2]) and got[0].dtype == np.uint8
        assert got[1].dtype == np.int64 and got[1].flags.writeable
    assert cache_files(tmp_path / "cache") == files


def test_cache_is_rebuilt_when_the_data_changes(fake, tmp_path):
    root, _ = fake
    du.load_CIFAR10_raw(root)
    old = cache_files(tmp_path / "cache")
    Xtr, *_ = make_fake_cifar(root, seed=7)
    stat = (root / "data_batch_1").stat()
    os.utime(root / "data_batch_1", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    got = du.load_CIFAR10_raw(root)
    np.testing.assert_array_equal(got[0], Xtr)
    new = cache_files(tmp_path / "cache")
    assert len(new) == 4 and not set(old) & set(new)  # the stale files were removed


def test_corrupt_cache_is_rebuilt(fake, tmp_path):
    root, (Xtr, *_) = fake
    du.load_CIFAR10_raw(root)
    path = next((tmp_path / "cache").glob("*-train-images.npy"))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2])
    np.testing.assert_array_equal(du.load_CIFAR10_raw(root)[0], Xtr)
    assert path.stat().st_size == size
    path.write_bytes(b"not a npy file at all")
    np.testing.assert_array_equal(du.get_CIFAR10_data(20, 7, 5, data_dir=root, lazy=True)["X_train"].raw, Xtr[:20])


def test_cache_can_be_bypassed_or_placed(fake, tmp_path):
    root, (Xtr, *_) = fake
    got = du.load_CIFAR10_raw(root, cache=False)
    assert not (tmp_path / "cache").exists() and not is_memory_mapped(got[0])
    np.testing.assert_array_equal(got[0], Xtr)
    du.get_CIFAR10_data(20, 7, 5, data_dir=root, cache=tmp_path / "elsewhere")
    assert len(cache_files(tmp_path / "elsewhere")) == 4 and not (tmp_path / "cache").exists()


def test_unwritable_cache_warns_and_keeps_going(fake, tmp_path, monkeypatch):
    root, (Xtr, *_) = fake
    blocker = tmp_path / "a_file"
    blocker.write_text("the cache directory cannot be created under a file")
    monkeypatch.setenv(du.CACHE_DIR_ENV, str(blocker / "cache"))
    with pytest.warns(du.DataCacheWarning, match="cannot write"):
        got = du.get_CIFAR10_data(20, 7, 5, data_dir=root, lazy=True)
    np.testing.assert_array_equal(got["X_train"].raw, Xtr[:20])


def test_cache_dir_locations(tmp_path, monkeypatch):
    assert du.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(du.CACHE_DIR_ENV)
    assert du.cache_dir() == tmp_path / "xdg" / "dpnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert du.cache_dir() == tmp_path / "home" / ".cache" / "dpnet"
    assert du.default_data_dir() == tmp_path / "home" / ".cache" / "dpnet" / "data"


# ------------------------------------------------------------------------------------------------ download
def leftovers(folder):
    """Whatever a failed download left in folder (must be nothing)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_importing_data_utils_leaves_the_download_modules_out():
    """The HTTP, URL and tar modules come in with dpnet.data.download, only when a download happens (numpy imports
    none of these three), so they cost no memory in a training process that finds the data."""
    code = ("import sys, dpnet.data_utils; print(sorted(m for m in "
            "('http.client','urllib.request','tarfile','dpnet.data.download') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(du.__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_download_names_are_the_download_modules_own():
    from dpnet.data import download
    for name in ("download_CIFAR10", "ChecksumError", "ArchiveError", "DownloadError", "CIFAR10_URL", "CIFAR10_MD5",
                 "URL_ENV"):
        assert getattr(du, name) is getattr(download, name) and name in dir(du)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        du.nope


def test_download_verifies_extracts_and_happens_once(server, archive, tmp_path):
    data, md5, (Xtr, ytr, Xte, yte) = archive
    server.files["/cifar-10-python.tar.gz"] = data
    dest = tmp_path / "downloads"
    url = server.url("/cifar-10-python.tar.gz")
    root = du.locate_CIFAR10(dest, url=url, md5=md5, progress=False)
    assert root == dest / du.CIFAR10_FOLDER and leftovers(dest) == [du.CIFAR10_FOLDER]
    assert du.locate_CIFAR10(dest, url=url, md5=md5) == root
    assert server.requests == ["/cifar-10-python.tar.gz"]
    got = du.get_CIFAR10_data(20, 7, 5, data_dir=dest, download=False, subtract_mean=False)
    np.testing.assert_array_equal(got["X_test"], Xte[:5])
    assert (root / "batches.meta").is_file()


def test_concurrent_downloads_fetch_once(server, archive, tmp_path):
    data, md5, _ = archive
    server.files["/a.tar.gz"], server.delay = data, 0.3
    results, errors = [], []

    def fetch():
        try:
            results.append(du.locate_CIFAR10(tmp_path / "d", url=server.url("/a.tar.gz"), md5=md5, progress=False))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and len(server.requests) == 1


def test_download_url_from_the_environment_into_a_named_folder(server, archive, tmp_path, monkeypatch):
    data, md5, _ = archive
    server.files["/mirror.tar.gz"] = data
    monkeypatch.setenv(du.URL_ENV, server.url("/mirror.tar.gz"))
    target = tmp_path / "x" / du.CIFAR10_FOLDER  # data_dir may name the batches folder itself
    assert du.locate_CIFAR10(target, md5=md5, progress=True) == target
    assert server.requests == ["/mirror.tar.gz"] and not missing_files(target)


def test_download_from_a_file_url(archive, tmp_path, monkeypatch):
    data, md5, _ = archive
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(data)
    monkeypatch.setenv(du.DATA_DIR_ENV, str(tmp_path / "env_data"))
    assert du.locate_CIFAR10(url=path.as_uri(), md5=md5) == tmp_path / "env_data" / du.CIFAR10_FOLDER


def test_md5_mismatch_names_both_hashes_and_keeps_nothing(server, archive, tmp_path, monkeypatch):
    """The archive is checked before anything is extracted: a mismatch never opens it at all."""
    import tarfile

    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    data, md5, _ = archive
    server.files["/a.tar.gz"] = data
    with pytest.raises(du.ChecksumError) as info:
        du.locate_CIFAR10(tmp_path / "d", url=server.url("/a.tar.gz"), md5="0" * 32)
    assert md5 in str(info.value) and "0" * 32 in str(info.value)
    assert leftovers(tmp_path / "d") == []
    assert opened == [], "the archive was opened before its checksum was known to be right"


def test_interrupted_download_keeps_nothing(server, archive, tmp_path):
    data, md5, _ = archive
    server.files["/a.tar.gz"] = data
    server.cut.add("/a.tar.gz")
    with pytest.raises(du.DownloadError):
        du.locate_CIFAR10(tmp_path / "d", url=server.url("/a.tar.gz"), md5=md5)
    assert leftovers(tmp_path / "d") == []
    with pytest.raises(du.CIFAR10NotFoundError):
        du.find_data_dir(tmp_path / "d")


def test_network_errors_say_how_to_get_the_data_by_hand(server, tmp_path):
    with pytest.raises(du.DownloadError, match="404") as info:
        du.locate_CIFAR10(tmp_path / "d", url=server.url("/missing.tar.gz"))
    text = str(info.value)
    assert server.url("/missing.tar.gz") in text and du.DATA_DIR_ENV in text and du.CIFAR10_URL in text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(du.DownloadError, match="by hand"):
        du.locate_CIFAR10(tmp_path / "d", url=f"http://127.0.0.1:{port}/a.tar.gz")
    assert leftovers(tmp_path / "d") == []


def test_no_download_when_not_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv(du.URL_ENV, "http://127.0.0.1:9/never")
    with pytest.raises(du.CIFAR10NotFoundError):
        du.get_CIFAR10_data(data_dir=tmp_path / "empty", download=False)


def _member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("evil", [
    _member("../evil"),
    _member(f"{du.CIFAR10_FOLDER}/../../evil"),
    _member("/tmp/dpnet-test-evil-absolute"),
    _member("elsewhere/evil"),
    _member(f"{du.CIFAR10_FOLDER}/evil", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    _member(f"{du.CIFAR10_FOLDER}/evil", kind=tarfile.LNKTYPE, link=f"{du.CIFAR10_FOLDER}/data_batch_1"),
    _member(f"{du.CIFAR10_FOLDER}/evil", kind=tarfile.FIFOTYPE),
], ids=["dotdot", "inner-dotdot", "absolute", "outside", "symlink", "hardlink", "fifo"])
def test_unsafe_archives_are_not_extracted(server, tmp_path, evil):
    make_fake_cifar(tmp_path / "src")
    data, md5 = tar_gz(folder_members(tmp_path / "src") + [evil])
    server.files["/a.tar.gz"] = data
    dest = tmp_path / "deep" / "d"
    with pytest.raises(du.ArchiveError, match="refusing to extract"):
        du.locate_CIFAR10(dest, url=server.url("/a.tar.gz"), md5=md5)
    assert leftovers(dest) == [] and not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not os.path.lexists("/tmp/dpnet-test-evil-absolute")


def test_corrupt_or_incomplete_archives(server, tmp_path):
    garbage = np.random.default_rng(0).bytes(5000)
    make_fake_cifar(tmp_path / "src")
    partial, partial_md5 = tar_gz(folder_members(tmp_path / "src")[:3])
    server.files.update({"/garbage": garbage, "/partial": partial})
    with pytest.raises(du.ArchiveError, match="cannot extract"):
        du.locate_CIFAR10(tmp_path / "d", url=server.url("/garbage"), md5=hashlib.md5(garbage).hexdigest())
    with pytest.raises(du.ArchiveError, match="lacks"):
        du.locate_CIFAR10(tmp_path / "d", url=server.url("/partial"), md5=partial_md5)
    assert leftovers(tmp_path / "d") == []


# -------------------------------------------------------------------------------------------- the real data
SEED_SHAPES = {"X_train": (49000, 3, 32, 32), "y_train": (49000,), "X_val": (1000, 3, 32, 32), "y_val": (1000,),
               "X_test": (1000, 3, 32, 32), "y_test": (1000,)}


@pytest.fixture(scope="module")
def real(cifar10_dir, tmp_path_factory):
    """The real data loaded lazily (cold cache, then warm) and eagerly, with the seconds each load took."""
    cache = tmp_path_factory.mktemp("real_cache")
    out, seconds = {}, {}
    for name, lazy in [("lazy, cold cache", True), ("lazy, warm cache", True), ("eager, warm cache", False)]:
        start = time.perf_counter()
        out[name] = du.get_CIFAR10_data(data_dir=cifar10_dir, lazy=lazy, download=False, cache=cache)
        seconds[name] = time.perf_counter() - start
    return out, seconds


def test_real_data_shapes_as_the_seed_prints_and_load_times(real, capsys):
    out, seconds = real
    for data in out.values():
        assert {k: v.shape for k, v in data.items()} == SEED_SHAPES and list(data) == KEYS
        assert data["y_train"].dtype == np.int64 and data["X_train"].dtype == np.float64
    with capsys.disabled():
        print("\nCIFAR-10 load times: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    # the warm lazy load maps the uint8 cache: a fraction of the eager load, which converts every image
    assert seconds["lazy, warm cache"] <= 0.5 * seconds["eager, warm cache"], seconds


def test_real_data_lazy_equals_eager_bit_for_bit(real):
    out, _ = real
    lazy, eager = out["lazy, warm cache"], out["eager, warm cache"]
    rng = np.random.default_rng(0)
    for key in ("X_train", "X_val", "X_test"):
        n = len(eager[key])
        for idx in [rng.choice(n, 100, replace=False), np.sort(rng.choice(n, 64)), slice(n - 50, n), n // 2]:
            assert np.array_equal(np.asarray(lazy[key][idx]), eager[key][idx]), (key, idx)
    assert np.array_equal(lazy["y_train"], eager["y_train"])
    mean = lazy["X_train"].raw.mean(axis=0, dtype=np.float64)
    assert np.array_equal(lazy["X_train"].mean_image, mean)


def test_real_batch_loads_and_truncated_copy_fails(cifar10_dir, tmp_path):
    root = du.find_data_dir(cifar10_dir)
    X, y = du.load_CIFAR_batch(root / "data_batch_1")
    assert X.shape == (10000, 3, 32, 32) and X.dtype == np.uint8 and y.shape == (10000,) and y.max() == 9
    copy = tmp_path / "data_batch_1"
    with open(root / "data_batch_1", "rb") as f:
        copy.write_bytes(f.read(5_000_000))
    with pytest.raises(du.BatchFormatError, match=str(copy)):
        du.load_CIFAR_batch(copy)
