"""What dpnet loads through the entry point: a swish activation and the Lion update rule."""

import numpy as np

from dpnet import Layer, hookimpl


def swish_forward(x):
    """Swish (also called SiLU): x * sigmoid(x).

    Input x: any shape. Returns (out, cache): out has x's shape and dtype.
    """
    s = 0.5 * (1 + np.tanh(0.5 * x))  # sigmoid(x), without overflow for large |x|
    return x * s, (x, s)


def swish_backward(dout, cache):
    """Backward pass of swish. Returns dx = dout * (s + x * s * (1 - s)), of x's shape."""
    x, s = cache
    return dout * (s + x * s * (1 - s))


def lion(w, dw, config=None):
    """Lion (Chen et al., 2023): a step of fixed size along the sign of an interpolated momentum.

    config: learning_rate (1e-4; Lion wants 3-10x less than Adam), beta1 (0.9), beta2 (0.99),
    weight_decay (0.0); state m (zeros like w).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-4)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.99)
    config.setdefault("weight_decay", 0.0)
    m = config.get("m")
    if m is None:
        m = np.zeros_like(w)
    direction = np.sign(config["beta1"] * m + (1 - config["beta1"]) * dw)
    next_w = w - config["learning_rate"] * (direction + config["weight_decay"] * w)
    config["m"] = config["beta2"] * m + (1 - config["beta2"]) * dw
    return next_w, config


@hookimpl
def dpnet_layers():
    return [Layer("swish", "activation", swish_forward, swish_backward)]


@hookimpl
def dpnet_update_rules():
    return {"lion": lion}
