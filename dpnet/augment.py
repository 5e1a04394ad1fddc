"""Data augmentation for image minibatches: random crops with padding and horizontal flips.

The random choices for a whole global minibatch are drawn first (`draw`) and then applied to any slice of it
(`apply`, or `take` straight from the training images), so N processes that each hold a shard of the batch transform
their rows exactly as one process would. Images are (N, C, H, W) floats after mean subtraction, so zero padding is
padding with the mean image.
"""

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class Augmentation:
    """What to do to each training image: pad by `crop_padding` pixels and take a random crop of the original size
    (0 disables crops); mirror left-right with probability `flip_probability`."""

    crop_padding: int = 4
    flip_probability: float = 0.5

    def __post_init__(self):
        if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability!r}")

    def draw(self, rng, n):
        """Random choices for n images: (flips (n,) bool, dy (n,) int, dx (n,) int), offsets in [0, 2 * padding]."""
        flips = rng.random(n) < self.flip_probability
        dy, dx = rng.integers(0, 2 * self.crop_padding + 1, size=(2, n))
        return flips, dy, dx

    def take(self, images, rows, choices):
        """apply(images[rows], choices): the rows of the training images, transformed. An ImageArray (uint8 images,
        dpnet.data) crops and flips its uint8 pixels before converting them, which is faster and gives the same
        values bit for bit."""
        crops = getattr(images, "crops", None)
        if crops is None:
            return self.apply(images[rows], choices)
        flips, dy, dx = choices
        return crops(rows, flips, dy, dx, self.crop_padding)

    def apply(self, X, choices):
        """Transform the images X (n, C, H, W) by choices (from draw, sliced to the same n rows): a new array."""
        flips, dy, dx = choices
        if X.ndim != 4:
            raise ValueError(f"augmentation needs images of shape (N, C, H, W), got {X.shape}")
        return crop_and_mirror(pad_images(X, self.crop_padding), flips, dy, dx, X.shape[2:])


def pad_images(X, padding):
    """X (n, C, H, W) with `padding` zeros around each image: a new array (n, C, H + 2p, W + 2p)."""
    n, C, H, W = X.shape
    p = int(padding)
    padded = np.zeros((n, C, H + 2 * p, W + 2 * p), dtype=X.dtype)  # (np.pad takes longer)
    padded[:, :, p:p + H, p:p + W] = X
    return padded


def crop_and_mirror(padded, flips, dy, dx, size):
    """From images padded on every side, padded (n, C, H + 2p, W + 2p), the window of size (H, W) at (dy, dx) of each
    image, mirrored left-right where `flips`: a new array (n, C, H, W) gathered in one pass (the mirror image of the
    window at column dx is the window at column 2p - dx of the mirrored padded image)."""
    n, C = padded.shape[:2]
    H, W = size
    flips = np.asarray(flips, dtype=bool)
    dy, dx = np.asarray(dy), np.asarray(dx)
    column = np.where(flips, padded.shape[3] - W - dx, dx)
    out = np.empty((n, C, H, W), dtype=padded.dtype)
    for flip in (False, True):
        chosen = np.flatnonzero(flips == flip)
        source = padded[..., ::-1] if flip else padded
        windows = sliding_window_view(source, (H, W), axis=(2, 3))  # (n, C, 2p+1, 2p+1, H, W), no copy
        out[chosen] = windows[chosen, :, dy[chosen], column[chosen]]
    return out
