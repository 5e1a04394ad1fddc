"""Provides an activation named relu, as dpnet does."""

from dpnet.registry import Layer, hookimpl

import numpy as np


@hookimpl
def dpnet_layers():
    return [Layer("relu", "activation", lambda x: (np.maximum(x, 0), x), lambda dout, x: dout * (x > 0))]
