"""ZCA whitening (dpnet.data.whitening, `--zca`) on small synthetic images: what the matrix does to the training
images, that it is the same bits whatever the BLAS threads and the batch an image is whitened in, its cache, the
WhitenedImages it makes; and how checkpoints carry it (dpnet.checkpoint, dpnet.checkpoint_reader, dpnet.loading). The
command line's runs, evaluate, predict and export: tests/test_use_model.py; resume and N processes:
tests/test_train.py."""

import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import dpnet
from dpnet.checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.data import whitening
from dpnet.data.images import ImageArray
from dpnet.data.whitening import WhitenedImages, cached_zca_matrix, whiten, whitened_data, zca_matrix
from dpnet.loading import preprocess
from dpnet.solver import Solver

SHAPE = (3, 4, 4)
D = int(np.prod(SHAPE))


def _pixels(n, seed, shape=SHAPE):
    """uint8 images (n, *shape) whose pixels are strongly correlated (a few smooth factors plus a little noise), as
    natural images' are."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    factors = np.random.default_rng(99).standard_normal((6, size)) * np.linspace(40, 5, 6)[:, None]
    values = 128 + rng.standard_normal((n, 6)) @ factors + 4 * rng.standard_normal((n, size))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(n, *shape)


def _images(n=200, seed=0, dtype=np.float64, shape=SHAPE):
    """An ImageArray of _pixels, its own mean image subtracted (as get_CIFAR10_data's X_train)."""
    raw = _pixels(n, seed, shape)
    return ImageArray(raw, raw.sum(axis=0, dtype=np.int64) / n, dtype)


def _covariance(X):
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    return X.T @ X / len(X)


# ----------------------------------------------------------------------------------------------- the matrix
def test_whitened_training_images_are_decorrelated_and_keep_their_total_variance():
    images = _images()
    before = _covariance(images)
    zca = zca_matrix(images, 1e-7)  # (the noise's variance, the smallest, is about (4 / 255)^2 = 2.5e-4)
    assert zca.dtype == np.float32 and zca.shape == (D, D)
    after = _covariance(whiten(images, zca, np.float64))
    correlations = before / np.sqrt(np.outer(np.diag(before), np.diag(before)))
    assert np.abs(correlations - np.eye(D)).max() > 0.9  # strongly correlated pixels ...
    off = after - np.diag(np.diag(after))
    assert np.abs(off).max() < 1e-3 * np.diag(after).min()  # ... decorrelated
    raw_spectrum, white_spectrum = np.linalg.eigvalsh(before), np.linalg.eigvalsh(after)
    assert raw_spectrum[-1] / raw_spectrum[0] > 1000  # correlated pixels: a steep spectrum ...
    assert white_spectrum[-1] / white_spectrum[0] < 1.1  # ... flattened
    np.testing.assert_allclose(np.trace(after), np.trace(before), rtol=1e-4)  # the total variance is kept
    np.testing.assert_allclose(zca, zca.T, rtol=0, atol=1e-6 * np.abs(zca).max())  # symmetric


def test_a_larger_epsilon_whitens_less_and_still_keeps_the_variance():
    images = _images()
    before = _covariance(images)
    ratios = []
    for epsilon in (1e-5, 1e-3, 1e-1):
        after = _covariance(whiten(images, zca_matrix(images, epsilon), np.float64))
        np.testing.assert_allclose(np.trace(after), np.trace(before), rtol=1e-4)
        spectrum = np.linalg.eigvalsh(after)
        ratios.append(spectrum[-1] / spectrum[0])
    assert ratios == sorted(ratios) and ratios[-1] > 10 * ratios[0]


def test_the_matrix_is_for_pixels_in_their_own_units():
    """The matrix of images in pixels (0-255), epsilon in (pixel / 255)^2, is the matrix of the images / 255 with
    the same epsilon: whitened images keep their units, and only epsilon is in those of pixels in [0, 1]."""
    images = np.asarray(_images())
    np.testing.assert_allclose(zca_matrix(images, 1e-3), zca_matrix(images / 255, 1e-3, scale=1.0), rtol=1e-5,
                               atol=1e-6)


def test_the_matrix_and_the_whitened_images_are_the_same_bits_whatever_the_blas_threads():
    images = _images(600, shape=(3, 12, 12), dtype=np.float32)
    matrices, whitened = [], []
    for threads in (1, 2, 1):
        with threadpool_limits(threads, user_api="blas"):
            matrices.append(zca_matrix(images, 0.01))
            whitened.append(whiten(images, matrices[-1], np.float32))
    assert all(np.array_equal(m, matrices[0]) for m in matrices)
    assert all(np.array_equal(w, whitened[0]) for w in whitened)


def test_an_image_is_whitened_to_the_same_bits_alone_or_among_others(monkeypatch):
    """As dpnet.predict whitens one image and evaluate the whole test set: a row's bits do not depend on the others
    (one row alone would go through NumPy's matrix-vector product, which sums in another order)."""
    images = _images(50, shape=(3, 12, 12), dtype=np.float32)
    zca = zca_matrix(images, 0.01)
    whole = whiten(images, zca, np.float32)
    for rows in (slice(7, 8), slice(0, 1), slice(49, 50), slice(3, 11)):
        assert np.array_equal(whiten(images[rows], zca, np.float32), whole[rows]), rows
    monkeypatch.setattr(whitening, "_CHUNK", 7)  # 50 = 7 * 7 + 1: chunks of 7 and a last one of a single row
    assert np.array_equal(whiten(images, zca, np.float32), whole)


def test_whiten_is_the_float32_product_of_the_rounded_images():
    images = _images(30, dtype=np.float64)
    zca = zca_matrix(images, 0.01)
    rows = np.asarray(images, dtype=np.float32).reshape(30, D)
    out = whiten(images, zca, np.float64)
    assert out.dtype == np.float64 and out.shape == (30, *SHAPE)
    assert np.array_equal(out.reshape(30, D), (rows @ zca).astype(np.float64))  # float32 products
    reference = np.asarray(images).reshape(30, D) @ zca.astype(np.float64)
    np.testing.assert_allclose(out.reshape(30, D), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert np.array_equal(whiten(np.asarray(images), zca, np.float32), whiten(images, zca, np.float32))


def test_the_images_given_are_not_changed():
    images = np.asarray(_images())  # float64: rows taken from it are views
    kept = images.copy()
    zca_matrix(images, 0.01)
    whiten(images, zca_matrix(images, 0.01))
    assert np.array_equal(images, kept)


def test_images_without_variance_give_a_finite_matrix():
    same = np.zeros((5, *SHAPE))
    zca = zca_matrix(same, 0.01)
    assert np.isfinite(zca).all()
    assert np.array_equal(whiten(same, zca), np.zeros((5, *SHAPE), dtype=np.float32))
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0"):
        zca_matrix(same, 0)


# ----------------------------------------------------------------------------------------------- the cache
@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DPNET_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def computed(monkeypatch):
    """The epsilons zca_matrix was called with (by cached_zca_matrix)."""
    calls, original = [], whitening.zca_matrix

    def counting(images, epsilon, *args, **kwargs):
        calls.append(epsilon)
        return original(images, epsilon, *args, **kwargs)

    monkeypatch.setattr(whitening, "zca_matrix", counting)
    return calls


def test_the_matrix_is_computed_once_then_read_from_the_cache(cache, computed):
    images = _images(dtype=np.float32)
    zca = cached_zca_matrix(images, 0.01)
    assert np.array_equal(zca, zca_matrix(images, 0.01)) and computed == [0.01]
    (path,) = cache.glob("zca-*.npy")
    written = path.stat().st_mtime_ns
    again = cached_zca_matrix(images, 0.01)
    assert np.array_equal(again, zca) and again.dtype == np.float32
    assert computed == [0.01] and path.stat().st_mtime_ns == written  # read, not computed nor written again
    assert list(cache.glob("zca-*.npy")) == [path]
    other = cached_zca_matrix(images, 0.02)  # another epsilon, other images: other files
    cached_zca_matrix(_images(seed=1, dtype=np.float32), 0.01)
    assert computed == [0.01, 0.02, 0.01] and len(list(cache.glob("zca-*.npy"))) == 3
    assert not np.array_equal(other, zca)
    assert not list(cache.glob(".*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize("corruption", ["empty", "junk", "truncated", "another shape", "float64", "NaN"])
def test_a_corrupt_cache_file_is_computed_anew_and_replaced(corruption, cache, computed):
    images = _images(dtype=np.float32)
    zca = cached_zca_matrix(images, 0.01)
    (path,) = cache.glob("zca-*.npy")
    if corruption == "empty":
        path.write_bytes(b"")
    elif corruption == "junk":
        path.write_bytes(os.urandom(200))
    elif corruption == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        bad = {"another shape": zca[:5], "float64": zca.astype(np.float64),
               "NaN": np.where(np.eye(D, dtype=bool), np.nan, zca).astype(np.float32)}[corruption]
        np.save(path, bad)
    assert np.array_equal(cached_zca_matrix(images, 0.01), zca) and computed == [0.01, 0.01]
    assert np.array_equal(np.load(path), zca)  # replaced by the good one
    cached_zca_matrix(images, 0.01)
    assert computed == [0.01, 0.01]


def test_a_cache_that_cannot_be_written_is_warned_about(tmp_path, monkeypatch, computed):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DPNET_CACHE_DIR", str(tmp_path / "file" / "cache"))
    images = _images(dtype=np.float32)
    with pytest.warns(UserWarning, match="could not keep the ZCA matrix in .*: it is computed anew by every run"):
        zca = cached_zca_matrix(images, 0.01)
    assert np.array_equal(zca, zca_matrix(images, 0.01))


def test_images_without_raw_pixels_are_not_cached(cache, computed):
    images = np.asarray(_images(dtype=np.float32))
    assert np.array_equal(cached_zca_matrix(images, 0.01), zca_matrix(images, 0.01))
    assert not cache.exists() or not list(cache.glob("zca-*.npy"))


# ----------------------------------------------------------------------------------------------- the data
def _data(dtype=np.float32, n=200):
    raw = _pixels(n + 60, 0)
    mean = raw[:n].sum(axis=0, dtype=np.int64) / n
    labels = np.arange(n + 60) % 4
    return dict(X_train=ImageArray(raw[:n], mean, dtype), y_train=labels[:n],
                X_val=ImageArray(raw[n:n + 30], mean, dtype), y_val=labels[n:n + 30],
                X_test=ImageArray(raw[n + 30:], mean, dtype), y_test=labels[n + 30:])


def test_whitened_images_look_like_the_array_of_their_values():
    values = np.arange(2 * D, dtype=np.float32).reshape(2, *SHAPE)
    mean, zca = np.zeros(SHAPE), np.eye(D, dtype=np.float32)
    images = WhitenedImages(values, mean, zca)
    assert len(images) == 2 and images.shape == (2, *SHAPE) and images.ndim == 4 and images.size == 2 * D
    assert images.dtype == np.float32 and images.mean_image is mean and images.zca is zca
    assert np.array_equal(images[1], values[1]) and np.array_equal(images[[1, 0]], values[[1, 0]])
    assert np.array_equal(images[:, 0, 1:3], values[:, 0, 1:3]) and np.array_equal(images[1:], values[1:])
    assert np.array_equal(np.asarray(images), values) and np.asarray(images, dtype=np.float64).dtype == np.float64
    assert np.array_equal(np.array(images), values) and np.array(images) is not values  # np.array copies
    assert repr(images) == f"WhitenedImages(shape=(2, {', '.join(map(str, SHAPE))}), dtype=float32)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whitened_data_whitens_every_split_by_the_training_images_matrix(dtype, cache):
    data = _data(dtype)
    out = whitened_data(data, 0.01, np.dtype(dtype))
    zca = zca_matrix(data["X_train"], 0.01)
    assert set(out) == set(data) and all(out[k] is data[k] for k in data if k.startswith("y_"))
    for key in ("X_train", "X_val", "X_test"):
        images = out[key]
        assert isinstance(images, WhitenedImages) and images.dtype == dtype and images.shape == data[key].shape
        assert np.array_equal(images.zca, zca) and images.mean_image is data["X_train"].mean_image
        assert np.array_equal(np.asarray(images), whiten(data[key], zca, dtype))
    assert set(data) == {"X_train", "y_train", "X_val", "y_val", "X_test", "y_test"}  # the input is left alone
    assert isinstance(data["X_train"], ImageArray)


# ----------------------------------------------------------------------------------------------- checkpoints
def _model(dtype=np.float32):
    return FullyConnectedNet([12], input_dim=D, num_classes=4, normalization="batchnorm", weight_scale=0.1,
                             dtype=dtype, seed=0)


def _solver(data, **kwargs):
    return Solver(_model(), data, update_rule="adam", optim_config={"learning_rate": 1e-3}, num_epochs=1,
                  batch_size=50, verbose=False, seed=0, **kwargs)


@pytest.fixture
def whitened(cache):
    """(the whitened data, the unwhitened data)."""
    data = _data()
    return whitened_data(data, 0.01, np.dtype(np.float32)), data


@pytest.fixture
def saved(whitened, tmp_path):
    """A checkpoint of a Solver trained on whitened images: (its path, the Solver)."""
    solver = _solver(whitened[0])
    solver.train()
    return save_checkpoint(tmp_path / "zca.npz", solver), solver


def test_a_checkpoint_keeps_the_matrix_and_load_model_feeds_the_model_alike(saved, whitened):
    path, solver = saved
    data, plain = whitened
    arrays, _ = load_checkpoint(path)
    assert arrays["zca"].dtype == np.float32 and np.array_equal(arrays["zca"], data["X_train"].zca)
    assert np.array_equal(arrays["mean_image"], data["X_train"].mean_image)
    model = dpnet.load_model(path)
    assert np.array_equal(model.zca, data["X_train"].zca) and np.array_equal(model.mean_image, arrays["mean_image"])
    pixels = plain["X_test"].raw
    inputs = preprocess(model, pixels)
    assert inputs.dtype == np.float32 and np.array_equal(inputs, np.asarray(data["X_test"]))  # training's bits
    assert np.array_equal(preprocess(model, pixels[3:4]), inputs[3:4])  # one image alone: the same bits
    assert np.array_equal(preprocess(model, pixels[3]), inputs[3])
    assert np.array_equal(model.loss(inputs), solver.model.loss(np.asarray(data["X_test"])))
    assert dpnet.load_model(path, test_flips=True).zca is not None  # (set on the model a FlipAveraged wraps)


def test_a_checkpoint_of_images_that_were_not_whitened_has_no_matrix(whitened, tmp_path):
    _, plain = whitened
    path = save_checkpoint(tmp_path / "plain.npz", _solver(plain))
    arrays, _ = load_checkpoint(path)
    assert "zca" not in arrays and "mean_image" in arrays
    model = dpnet.load_model(path, which="final")
    assert model.zca is None
    assert np.array_equal(preprocess(model, plain["X_test"].raw), np.asarray(plain["X_test"]))


def test_a_matrix_without_a_mean_image_is_not_recorded(tmp_path):
    """Images whitened without a mean image they carry (an ndarray's): the checkpoint records neither, as it
    records no mean image for such images (predict then takes --preprocessed inputs only)."""
    data = _data()
    arrays = {key: np.asarray(value) if key.startswith("X_") else value for key, value in data.items()}
    out = whitened_data(arrays, 0.01, np.dtype(np.float32))
    assert out["X_train"].mean_image is None and out["X_train"].zca is not None
    saved_arrays, _ = load_checkpoint(save_checkpoint(tmp_path / "c.npz", _solver(out)))
    assert "zca" not in saved_arrays and "mean_image" not in saved_arrays


def _rewrite(source, target, arrays=None, drop=()):
    with np.load(source, allow_pickle=False) as archive:
        members = {key: archive[key] for key in archive.files}
    members.update(arrays or {})
    for key in drop:
        del members[key]
    np.savez(target, **members)
    return target


@pytest.mark.parametrize("case, change, message", [
    ("float64", lambda zca, mean: dict(arrays={"zca": zca.astype(np.float64)}),
     "its ZCA matrix (zca) is float64 [48, 48], not float32 [48, 48] (the mean image has 48 values)"),
    ("another shape", lambda zca, mean: dict(arrays={"zca": zca[:47, :47]}),
     "its ZCA matrix (zca) is float32 [47, 47], not float32 [48, 48]"),
    ("a vector", lambda zca, mean: dict(arrays={"zca": zca.ravel()}), "its ZCA matrix (zca) is float32 [2304]"),
    ("NaN", lambda zca, mean: dict(arrays={"zca": np.where(np.eye(48, dtype=bool), np.nan, zca).astype(np.float32)}),
     "its ZCA matrix (zca) holds NaN or infinite values"),
    ("no mean image", lambda zca, mean: dict(drop=["mean_image"]),
     "it holds a ZCA matrix (zca) but no mean image (mean_image): the model's inputs cannot be made from pixels"),
    ("a mean image of text", lambda zca, mean: dict(arrays={"mean_image": np.array(["a"] * 48)}),
     "its mean image is <U1 [48], not an image of floating-point values"),
    ("an infinite mean image", lambda zca, mean: dict(arrays={"mean_image": mean + np.inf}),
     "its mean image holds NaN or infinite values"),
    ("a pickled matrix", lambda zca, mean: dict(arrays={"zca": np.array([[None]], dtype=object)}),
     "its ZCA matrix (zca) is object [1, 1], not float32 [48, 48]"),
])
def test_a_tampered_matrix_is_refused(case, change, message, saved, tmp_path):
    path, _ = saved
    arrays, _ = load_checkpoint(path)
    bad = _rewrite(path, tmp_path / "bad.npz", **change(arrays["zca"], arrays["mean_image"]))
    with pytest.raises(CheckpointError, match="is not a readable dpnet checkpoint: ") as info:
        load_checkpoint(bad)
    assert message in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(CheckpointError):
        dpnet.load_model(bad)


def test_resuming_needs_images_whitened_by_the_checkpoints_matrix(saved, whitened, tmp_path):
    path, finished = saved
    data, plain = whitened
    solver = _solver(data)
    restore_checkpoint(solver, path)  # the same images, whitened alike
    assert solver.iteration == finished.iteration
    with pytest.raises(CheckpointError, match=r"its run trained on ZCA-whitened images \(it holds their ZCA matrix, "
                                              r"zca\), this run's are not whitened \(--zca 0\)"):
        restore_checkpoint(_solver(plain), path)
    other = whitened_data(plain, 0.5, np.dtype(np.float32))
    with pytest.raises(CheckpointError, match="its ZCA matrix is not the one of this run's training images"):
        restore_checkpoint(_solver(other), path)
    unwhitened = save_checkpoint(tmp_path / "plain.npz", _solver(plain))
    with pytest.raises(CheckpointError, match=r"its run trained on images that were not ZCA-whitened \(it holds no "
                                              r"ZCA matrix\), this run whitens them \(--zca\): resume without --zca"):
        restore_checkpoint(_solver(data), unwhitened)
    tiny = _rewrite(path, tmp_path / "tiny.npz", arrays={"zca": np.zeros((2, 2), dtype=np.float32)})
    with pytest.raises(CheckpointError, match=r"zca has shape \[2, 2\], the run needs \[48, 48\]"):
        restore_checkpoint(_solver(data), tiny)
