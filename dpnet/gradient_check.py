"""Numerical gradients by centred differences, for checking analytic backward passes (use float64)."""

from random import randrange

import numpy as np


def rel_error(x, y):
    """Maximum elementwise relative error between x and y (each difference over max(1e-8, |x| + |y|))."""
    x, y = np.asarray(x), np.asarray(y)
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Numerical gradient of a scalar function f at x, one centred difference per element.

    Inputs:
    - f: callable taking x (any value; x is perturbed in place, so f may ignore its argument and read x directly)
    - x: ndarray, the point; restored before returning
    - h: step

    Returns grad of x's shape.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        fxph = f(x)
        x[ix] = old - h
        fxmh = f(x)
        x[ix] = old
        grad[ix] = (fxph - fxmh) / (2 * h)
        if verbose:
            print(ix, grad[ix])
        it.iternext()
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Numerical gradient of sum(f(x) * df) for an array-valued f: the backward pass with upstream gradient df.

    Inputs: f callable on x returning an array of df's shape; x ndarray (restored before returning); df upstream.
    Returns grad of x's shape.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        pos = f(x).copy()
        x[ix] = old - h
        neg = f(x).copy()
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def grad_check_sparse(f, x, analytic_grad, num_checks=10, h=1e-5, verbose=True):
    """Compare analytic_grad with centred differences of the scalar f at num_checks random elements of x.

    Returns the list of relative errors (printed too when verbose).
    """
    errors = []
    for _ in range(num_checks):
        ix = tuple(randrange(n) for n in x.shape)
        old = x[ix]
        x[ix] = old + h
        fxph = f(x)
        x[ix] = old - h
        fxmh = f(x)
        x[ix] = old
        numeric = (fxph - fxmh) / (2 * h)
        analytic = analytic_grad[ix]
        error = abs(numeric - analytic) / max(1e-12, abs(numeric) + abs(analytic))
        errors.append(error)
        if verbose:
            print(f"numerical: {numeric:f} analytic: {analytic:f}, relative error: {error:e}")
    return errors
