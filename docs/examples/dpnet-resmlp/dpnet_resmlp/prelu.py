"""PReLU, a layer with weights: a rectifier whose negative slope is learned, one slope per unit."""

import numpy as np


def prelu_init(in_dim, rng, dtype, slope=0.25):
    """The parameters of a PReLU on samples of shape in_dim, and the shape of its output (in_dim).

    Params: alpha (D,), the negative slopes of the D = prod(in_dim) units, all `slope` at first. A vector even for
    images: the model's L2 `reg` (and weight decay) act on parameters of two or more dimensions only.
    """
    if not 0 <= slope <= 1:
        raise ValueError(f"slope must be in [0, 1], got {slope!r}")
    return {"alpha": np.full(int(np.prod(in_dim)), slope, dtype=dtype)}, tuple(in_dim)


def prelu_forward(x, params, state):
    """out = x where x > 0, else alpha * x. Input x (N, *in_dim). Returns (out, cache): out has x's shape."""
    x2d = x.reshape(x.shape[0], -1)
    out = np.where(x2d > 0, x2d, params["alpha"] * x2d)
    return out.reshape(x.shape), (x2d, params["alpha"])


def prelu_backward(dout, cache):
    """Backward pass of PReLU. Returns (dx, grads): dx of x's shape, grads {"alpha": (D,)}."""
    x2d, alpha = cache
    dout2d = dout.reshape(x2d.shape)
    negative = x2d <= 0
    dx = np.where(negative, alpha * dout2d, dout2d)
    dalpha = np.sum(x2d * dout2d * negative, axis=0)  # a sum over the batch, like every parameter gradient
    return dx.reshape(dout.shape), {"alpha": dalpha}
