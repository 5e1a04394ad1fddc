"""The data of the 1-vs-N equivalence scripts: Gaussian blobs, one per class, quantized to uint8 images, so that
the lazy data (ImageArray) and the eager data are the same values."""

import numpy as np

from dpnet.data_utils import ImageArray


def make_blob_images(seed, noise, shape, classes, sizes, lazy=False):
    """{"X_train", "y_train", "X_val", "y_val"}: sizes = (training, validation) images of `shape`, blobs of standard
    deviation `noise` around uniform centres, mean image of the training images subtracted (float64)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(60, 190, size=(classes, *shape))
    data = {}
    for split, n in zip(("train", "val"), sizes):
        y = rng.integers(classes, size=n)
        raw = np.clip(centres[y] + rng.normal(0, noise, size=(n, *shape)), 0, 255).astype(np.uint8)
        data[f"X_{split}"], data[f"y_{split}"] = raw, y
    mean = data["X_train"].mean(axis=0)
    for split in ("train", "val"):
        images = ImageArray(data[f"X_{split}"], mean, dtype=np.float64)
        data[f"X_{split}"] = images if lazy else np.asarray(images)
    return data
