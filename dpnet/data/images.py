"""ImageArray: uint8 images that look like the float array of mean-subtracted images, converted as rows are taken."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..augment import crop_and_mirror, pad_images

_CHUNK_BYTES = 32 << 20  # float64 scratch memory per conversion step of a large ImageArray selection
_CROP_CHUNK = 16  # images converted per step by ImageArray.crops: their float64 scratch stays in the L2 cache


def check_float_dtype(dtype, argname="dtype"):
    """np.dtype(dtype), which must be a floating point type; ValueError naming argname otherwise."""
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"{argname} must be a floating point dtype (e.g. np.float64, np.float32), got {dt}")
    return dt


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
        self._dtype = check_float_dtype(dtype)
        self._shifted_means_cache = {}

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

    def crops(self, rows, flips, dy, dx, padding):
        """Images `rows` padded with `padding` zeros (the mean image, once subtracted), cropped to their size at
        offsets (dy, dx) and mirrored left-right where `flips`: an ndarray (len(rows), C, H, W) of self.dtype.

        The same values bit for bit as converting first and then padding, cropping and flipping the floats
        (dpnet.augment.Augmentation.apply), but the crops and flips move uint8 pixels, and each pixel and its
        (shifted) mean are converted once. rows: integer indices; flips: bool; dy, dx: integers in [0, 2 * padding].
        """
        rows, flips = np.asarray(rows), np.asarray(flips, dtype=bool)
        dy, dx = np.asarray(dy), np.asarray(dx)
        n, p = len(rows), int(padding)
        if self._raw.ndim != 4:
            raise ValueError(f"crops needs images of shape (N, C, H, W), got {self._raw.shape}")
        _, C, H, W = self._raw.shape
        pixels = crop_and_mirror(pad_images(self._raw[rows], p), flips, dy, dx, (H, W))
        column = np.where(flips, 2 * p - dx, dx)  # the mean image's crops are indexed alike
        means = self._shifted_means(p)
        out = np.empty((n, C, H, W), dtype=self._dtype)
        for start in range(0, n, _CROP_CHUNK):
            part = slice(start, start + _CROP_CHUNK)
            scratch = means[flips[part].astype(np.intp), dy[part], column[part]]  # float64 (k, C, H, W)
            np.subtract(pixels[part], scratch, out=scratch)
            out[part] = scratch
        return out

    def _shifted_means(self, padding):
        """float64 (2, 2p+1, 2p+1, C, H, W): the mean image padded with zeros, cropped at every offset (dy, dx),
        unmirrored [0] and mirrored [1], as `crops` indexes it. Computed once per padding."""
        cache = self._shifted_means_cache
        if padding not in cache:
            p, (C, H, W) = padding, self._mean.shape
            padded = np.zeros((C, H + 2 * p, W + 2 * p))
            padded[:, p:p + H, p:p + W] = self._mean
            table = np.empty((2, 2 * p + 1, 2 * p + 1, C, H, W))
            for flip, source in enumerate((padded, padded[..., ::-1])):
                windows = sliding_window_view(source, (H, W), axis=(1, 2))  # (C, 2p+1, 2p+1, H, W)
                table[flip] = windows.transpose(1, 2, 0, 3, 4)
            table.flags.writeable = False
            cache[padding] = table
        return cache[padding]

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
