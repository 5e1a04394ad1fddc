"""A well-formed plugin providing one thing of every kind."""

from dpnet.registry import Layer, hookimpl

import numpy as np


def softsign_forward(x):
    return x / (1 + np.abs(x)), x


def softsign_backward(dout, cache):
    x = cache
    return dout / (1 + np.abs(x)) ** 2


def scale_forward(x, gamma, beta, param):
    """A per-feature affine map standing in for a normalization (same signature and gradients layout)."""
    return x * gamma + beta, (x, gamma)


def scale_backward(dout, cache):
    x, gamma = cache
    return dout * gamma, (dout * x).sum(axis=0), dout.sum(axis=0)


def squared_loss(scores, y):
    n = scores.shape[0]
    target = np.zeros_like(scores)
    target[np.arange(n), y] = 1
    diff = scores - target
    return 0.5 * np.sum(diff * diff) / n, diff / n


def signsgd(w, dw, config=None):
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    return w - config["learning_rate"] * np.sign(dw), config


@hookimpl
def dpnet_layers():
    return [
        Layer("fx_softsign", "activation", softsign_forward, softsign_backward),
        Layer("fx_scale", "normalization", scale_forward, scale_backward),
        Layer("fx_squared", "loss", squared_loss, None),
    ]


@hookimpl
def dpnet_update_rules():
    return {"fx_signsgd": signsgd}
