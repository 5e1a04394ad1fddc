"""A well-formed plugin providing a model (the dpnet_models hook): fx_mlp, a Sequential of a fixed pattern."""

import numpy as np

from dpnet.models import Sequential
from dpnet.registry import hookimpl


def mlp(width=32, depth=1, norm=True, input_dim=(3, 32, 32), loss="softmax", reg=0.0, dtype=np.float32, seed=None,
        label_smoothing=0.0):
    """depth hidden affine layers of `width` units (each followed by batchnorm if `norm`, then relu), then 10
    scores."""
    hidden = [{"layer": "affine", "units": width}, *(["batchnorm"] if norm else []), "relu"]
    return Sequential(hidden * depth + [{"layer": "affine", "units": 10}], input_dim=input_dim, loss=loss, reg=reg,
                      dtype=dtype, seed=seed, label_smoothing=label_smoothing)


@hookimpl
def dpnet_models():
    return {"fx_mlp": mlp}
