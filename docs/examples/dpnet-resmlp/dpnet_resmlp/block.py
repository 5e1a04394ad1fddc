"""A pre-norm residual block, out = x + W2 relu(W1 layernorm(x) + b1) + b2, built from dpnet.layers' functions."""

import numpy as np

from dpnet.layers import (affine_backward, affine_forward, layernorm_backward, layernorm_forward, relu_backward,
                          relu_forward)


def block_init(in_dim, rng, dtype, expansion=2):
    """The parameters of a block on samples of shape (D,), and the shape of its output, (D,).

    Params: gamma (D,) ones and beta (D,) zeros (the layer normalization); W1 (D, H) and b1 (H,), H = expansion * D
    hidden units; W2 (H, D) and b2 (D,). The weights are He-initialized, W2 ten times smaller: at first each block is
    close to the identity, and a stack of them trains like a shallow network.
    """
    if len(in_dim) != 1:
        raise ValueError(f"a block needs samples of shape (features,), got {tuple(in_dim)}: put an affine layer "
                         "before it")
    if isinstance(expansion, bool) or int(expansion) != expansion or expansion < 1:
        raise ValueError(f"expansion must be a positive integer, got {expansion!r}")
    D = in_dim[0]
    H = int(expansion) * D
    params = {"gamma": np.ones(D), "beta": np.zeros(D),
              "W1": np.sqrt(2 / D) * rng.standard_normal((D, H)), "b1": np.zeros(H),
              "W2": 0.1 * np.sqrt(2 / H) * rng.standard_normal((H, D)), "b2": np.zeros(D)}
    return {name: value.astype(dtype) for name, value in params.items()}, (D,)


def block_forward(x, params, state):
    """Input x (N, D). Returns (out, cache): out (N, D)."""
    h, ln_cache = layernorm_forward(x, params["gamma"], params["beta"], {})
    h, fc1_cache = affine_forward(h, params["W1"], params["b1"])
    h, relu_cache = relu_forward(h)
    h, fc2_cache = affine_forward(h, params["W2"], params["b2"])
    return x + h, (ln_cache, fc1_cache, relu_cache, fc2_cache)


def block_backward(dout, cache, need_dx=True, grads_out=None):
    """Backward pass of the block. Returns (dx, grads): dx (N, D), grads with the keys and shapes of params.

    Optional, for speed: need_dx=False when nothing needs dx (the block is the first layer; dx is then None), and
    grads_out, a dict of arrays to write the weights' gradients into (dpnet's gradient buffer: no allocation).
    """
    grads_out = grads_out or {}
    ln_cache, fc1_cache, relu_cache, fc2_cache = cache
    dh, dW2, db2 = affine_backward(dout, fc2_cache, dw_out=grads_out.get("W2"), db_out=grads_out.get("b2"))
    dh = relu_backward(dh, relu_cache)
    dh, dW1, db1 = affine_backward(dh, fc1_cache, dw_out=grads_out.get("W1"), db_out=grads_out.get("b1"))
    dx, dgamma, dbeta = layernorm_backward(dh, ln_cache)
    dx = dx + dout if need_dx else None  # the skip connection
    return dx, {"gamma": dgamma, "beta": dbeta, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}
