""""Sandwich" layers: common compositions of the layers in layers.py.

The generic sandwich takes the activation and normalization as forward/backward function pairs, so models can plug in
any registered layer without this module knowing about the registry.
"""

from .layers import affine_backward, affine_forward, dropout_backward, dropout_forward, relu_backward, relu_forward


def affine_relu_forward(x, w, b):
    """Affine followed by ReLU. Inputs x (N, d_1, ..., d_k), w (D, M), b (M,). Returns (out (N, M), cache)."""
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout, cache):
    """Backward pass of affine_relu. Returns (dx, dw, db)."""
    fc_cache, relu_cache = cache
    da = relu_backward(dout, relu_cache)
    return affine_backward(da, fc_cache)


def affine_norm_act_forward(x, w, b, activation, norm=None, gamma=None, beta=None, norm_param=None,
                            dropout_param=None):
    """affine - [norm] - activation - [dropout], the hidden block of FullyConnectedNet.

    Inputs:
    - x: (N, d_1, ..., d_k); w: (D, M); b: (M,)
    - activation: object with forward(x) -> (out, cache) and backward(dout, cache) -> dx (a registry Layer)
    - norm: None, or object with forward(x, gamma, beta, param) -> (out, cache) and
      backward(dout, cache) -> (dx, dgamma, dbeta); gamma, beta (M,) and norm_param (dict) go with it
    - dropout_param: None for no dropout, else the dict of dropout_forward

    Returns (out (N, M), cache).
    """
    out, fc_cache = affine_forward(x, w, b)
    norm_cache = dropout_cache = None
    if norm is not None:
        out, norm_cache = norm.forward(out, gamma, beta, norm_param)
    if activation.forward is relu_forward and out is not x:  # out is a fresh array of ours: no copy needed
        out, act_cache = relu_forward(out, overwrite_x=True)
    else:
        out, act_cache = activation.forward(out)
    if dropout_param is not None:
        out, dropout_cache = dropout_forward(out, dropout_param)
    return out, (fc_cache, norm, norm_cache, activation, act_cache, dropout_cache)


def affine_norm_act_backward(dout, cache, need_dx=True, dw_out=None, db_out=None):
    """Backward pass of affine_norm_act. Returns (dx, dw, db, dgamma, dbeta).

    dgamma and dbeta are None without a normalization; dx is None when need_dx is False; dw and db are written into
    dw_out and db_out when given (see affine_backward).
    """
    fc_cache, norm, norm_cache, activation, act_cache, dropout_cache = cache
    if dropout_cache is not None:
        dout = dropout_backward(dout, dropout_cache)
    dout = activation.backward(dout, act_cache)
    dgamma = dbeta = None
    if norm is not None:
        dout, dgamma, dbeta = norm.backward(dout, norm_cache)
    dx, dw, db = affine_backward(dout, fc_cache, need_dx, dw_out, db_out)
    return dx, dw, db, dgamma, dbeta
