"""Activations as dpnet layers: ``X_forward(x) -> (out, cache)``, ``X_backward(dout, cache) -> dx``.

Every function works on any shape and keeps the input's dtype (a float32 model stays float32).
"""

import math

import numpy as np


def leaky_relu_forward(x, alpha=0.01):
    """Leaky ReLU: x where x > 0, else alpha * x (alpha = 0.01 when used by name). Returns (out, (x, alpha))."""
    return np.where(x > 0, x, alpha * x), (x, alpha)


def leaky_relu_backward(dout, cache):
    """Backward pass of leaky ReLU: dout where x > 0, else alpha * dout."""
    x, alpha = cache
    return np.where(x > 0, dout, alpha * dout)


def elu_forward(x, alpha=1.0):
    """ELU: x where x > 0, else alpha * (exp(x) - 1) (alpha = 1 when used by name). Returns (out, (x, out, alpha))."""
    negative = alpha * np.expm1(np.minimum(x, 0))  # the minimum keeps exp from overflowing on the positive side
    out = np.where(x > 0, x, negative)
    return out, (x, out, alpha)


def elu_backward(dout, cache):
    """Backward pass of ELU: dout where x > 0, else dout * (out + alpha)."""
    x, out, alpha = cache
    return np.where(x > 0, dout, dout * (out + alpha))


_GELU_K = math.sqrt(2 / math.pi)
_GELU_C = 0.044715


def gelu_forward(x):
    """GELU in its tanh approximation (Hendrycks & Gimpel; the form GPT-2 and BERT use):
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))). It differs from the exact x * Phi(x) by less than 1e-3;
    NumPy has no vectorized erf, and the gradient check is of this function exactly. Returns (out, (x, t)).
    """
    t = np.tanh(_GELU_K * (x + _GELU_C * x**3))
    return 0.5 * x * (1 + t), (x, t)


def gelu_backward(dout, cache):
    """Backward pass of the tanh-approximated GELU."""
    x, t = cache
    dinner = _GELU_K * (1 + 3 * _GELU_C * x**2)
    return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)


def tanh_forward(x):
    """Hyperbolic tangent. Returns (out, out)."""
    out = np.tanh(x)
    return out, out


def tanh_backward(dout, cache):
    """Backward pass of tanh: dout * (1 - out^2)."""
    out = cache
    return dout * (1 - out * out)
