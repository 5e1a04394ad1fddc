"""ZCA whitening of images: decorrelated pixels, the same images otherwise.

The ZCA matrix of the mean-subtracted training images X (N, D), pixels scaled to [0, 1], is
Z = U diag(1 / sqrt(s + epsilon)) U^T with U diag(s) U^T = X^T X / N; `epsilon` keeps the faint directions (mostly
noise) from being blown up, and directions with no variance at all (fewer images than pixels) are dropped.
Multiplying by Z makes the pixels uncorrelated while keeping each image looking like itself (ZCA is the whitening
closest to the identity), so crops and flips still make sense on whitened images.
`zca_matrix` then scales Z so that the whitened images keep the raw ones' overall variance (the recipe's learning
rate and weight decay need no retuning) and returns it for images in their own units (0-255, mean subtracted):
whitened rows are (images - mean_image).reshape(N, D) @ Z.

Whitening is linear, so a model could learn it; it helps because the gradients of the first layer's weights are then
taken in decorrelated coordinates (plain MLPs on CIFAR-10 learn faster from whitened pixels: docs/results.md).
"""

import hashlib
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from .cache import cache_dir, save_atomic

_CHUNK = 2048  # images whitened per matrix product


def zca_matrix(images, epsilon, scale=255.0):
    """The float32 (D, D) ZCA matrix of `images` (N, ...): mean-subtracted floats in pixel units (an ImageArray or
    an ndarray; converted `_CHUNK` rows at a time). `epsilon` in units of (pixels / scale)^2.

    Computed in float64 with one BLAS thread, so that it is the same bits in every process of a job whatever its
    thread count (its processes then train exactly as one process does)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    n = len(images)
    with threadpool_limits(1, user_api="blas"):
        covariance = None
        for start in range(0, n, _CHUNK):
            rows = np.asarray(images[start:start + _CHUNK], dtype=np.float64).reshape(-1, _features(images))
            rows = rows / scale  # (not in place: the rows of a float64 ndarray are views of the caller's images)
            part = rows.T @ rows
            covariance = part if covariance is None else covariance + part
        covariance /= n
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = np.maximum(eigenvalues, 0)
        # Directions the training images do not span (fewer images than pixels) are dropped, not scaled by
        # 1 / sqrt(epsilon): other images' components along them were never seen in training.
        spanned = eigenvalues > eigenvalues.max(initial=0) * 1e-10
        zca = np.where(spanned, eigenvectors / np.sqrt(eigenvalues + epsilon), 0.0) @ eigenvectors.T
        # Total variance before, trace(C), and after whitening, trace(Z C Z) = sum(s / (s + eps)): keep it (images
        # that do not vary at all, such as a single one, have none to keep).
        after = np.sum(eigenvalues / (eigenvalues + epsilon))
        keep = np.sqrt(eigenvalues.sum() / after) if after > 0 else 1.0
    return (zca * keep).astype(np.float32)


def whiten(images, zca, dtype=np.float32):
    """(images (N, C, H, W) mean-subtracted, any float or ImageArray) @ zca, an ndarray (N, C, H, W) of dtype:
    float32 products, `_CHUNK` rows at a time.

    Each image's row is the same bits whichever images it is whitened with (an image alone, as dpnet.predict
    whitens it, or among the test set, as training and dpnet.evaluate do): a single row is multiplied as two, since
    NumPy hands one row to a matrix-vector product, which sums in another order than the matrix product."""
    n, shape = len(images), tuple(images.shape[1:])
    out = np.empty((n, *shape), dtype=dtype)
    flat = out.reshape(n, -1)
    for start in range(0, n, _CHUNK):
        rows = np.asarray(images[start:start + _CHUNK], dtype=np.float32).reshape(-1, zca.shape[0])
        if len(rows) == 1:
            flat[start] = (np.concatenate([rows, rows]) @ zca)[0]
        else:
            flat[start:start + len(rows)] = rows @ zca
    return out


class WhitenedImages:
    """Whitened images, computed once: looks like the float array `values` (N, C, H, W) (indexing, len, shape,
    dtype, np.asarray), and carries what made them: `mean_image` (float64 (C, H, W), subtracted first) and `zca`
    (float32 (D, D)), which checkpoints keep so that a trained model is fed its inputs alike (dpnet.loading)."""

    def __init__(self, values, mean_image, zca):
        self.values, self.mean_image, self.zca = values, mean_image, zca

    shape = property(lambda self: self.values.shape)
    ndim = property(lambda self: self.values.ndim)
    dtype = property(lambda self: self.values.dtype)
    size = property(lambda self: self.values.size)

    def __len__(self):
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def __array__(self, dtype=None, copy=None):
        return np.array(self.values, dtype=dtype, copy=copy)

    def __repr__(self):
        return f"WhitenedImages(shape={self.shape}, dtype={self.dtype})"


def cached_zca_matrix(images, epsilon):
    """zca_matrix(images, epsilon), kept in the data cache (dpnet.data.cache) as zca-<hash>.npy, the hash taken over
    the images' uint8 pixels (an ImageArray's; other images are not cached), mean image and epsilon: computing it takes
    about half a minute, reading it a fraction of a second. A cache that cannot be written is warned about."""
    raw = getattr(images, "raw", None)
    if raw is None:
        return zca_matrix(images, epsilon)
    digest = hashlib.sha256(f"zca-2 {epsilon!r} {raw.shape}".encode())
    digest.update(np.ascontiguousarray(raw).data)
    digest.update(np.ascontiguousarray(images.mean_image, dtype=np.float64).data)
    path = cache_dir() / f"zca-{digest.hexdigest()[:24]}.npy"
    D = int(np.prod(raw.shape[1:]))
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (D, D) and cached.dtype == np.float32 and np.isfinite(cached).all():
            return cached
    except (OSError, ValueError, EOFError):  # (EOFError: an empty file)
        pass  # missing or unreadable: computed anew and written again
    zca = zca_matrix(images, epsilon)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(path, zca)
    except OSError as exc:
        warnings.warn(f"could not keep the ZCA matrix in {path.parent} ({exc}): it is computed anew by every run",
                      stacklevel=2)
    return zca


def whitened_data(data, epsilon, dtype):
    """The CIFAR-10 splits of `data` (X_train, X_val, X_test: mean-subtracted, ImageArrays or arrays) whitened by the
    ZCA matrix of X_train (cached_zca_matrix): a new dict, each X a WhitenedImages of dtype (labels as they were)."""
    zca = cached_zca_matrix(data["X_train"], epsilon)
    mean = getattr(data["X_train"], "mean_image", None)
    out = dict(data)
    for key in ("X_train", "X_val", "X_test"):
        if key in data:
            out[key] = WhitenedImages(whiten(data[key], zca, dtype), mean, zca)
    return out


def _features(images):
    return int(np.prod(images.shape[1:]))
