"""Numerical gradients by centred differences, for checking analytic backward passes (use float64).

`order=2` is the seed's centred difference (f(x+h) - f(x-h)) / 2h, with error O(h^2). `order=4` uses the five-point
stencil (8(f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h, with error O(h^4): twice the evaluations, but with a
larger h it checks smooth functions to 1e-10 where the second-order difference stalls around 1e-8.
"""

from random import randrange

import numpy as np

# (step multiple, weight) of each symmetric pair f(x + k h) - f(x - k h), and the denominator. Pairs are differenced
# element by element before anything is summed, so outputs that the perturbation does not touch cancel exactly; for
# order 2 this is the seed's arithmetic, (f(x + h) - f(x - h)) / 2h.
_STENCILS = {2: (((1, 1),), 2), 4: (((1, 8), (2, -1)), 12)}


def rel_error(x, y):
    """Maximum elementwise relative error between x and y (each difference over max(1e-8, |x| + |y|))."""
    x, y = np.asarray(x), np.asarray(y)
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


def _derivative(evaluate, x, ix, h, order):
    """The centred-difference derivative of evaluate() (a scalar or an array) by x[ix]; x[ix] is restored."""
    if order not in _STENCILS:
        raise ValueError(f"order must be 2 or 4, got {order!r}")
    pairs, denominator = _STENCILS[order]
    old = x[ix]
    total = 0
    try:
        for steps, weight in pairs:
            x[ix] = old + steps * h
            plus = np.copy(evaluate())
            x[ix] = old - steps * h
            minus = np.copy(evaluate())
            total = total + weight * (plus - minus)
    finally:
        x[ix] = old
    return total / (denominator * h)


def eval_numerical_gradient(f, x, verbose=True, h=1e-5, order=2):
    """Numerical gradient of a scalar function f at x, one centred difference per element.

    Inputs:
    - f: callable taking x (x is perturbed in place, so f may ignore its argument and read x directly)
    - x: ndarray, the point; restored before returning
    - h: step; order: 2 or 4 (see the module docstring)

    Returns grad of x's shape.
    """
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        grad[ix] = _derivative(lambda: f(x), x, ix, h, order)
        if verbose:
            print(ix, grad[ix])
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5, order=2):
    """Numerical gradient of sum(f(x) * df) for an array-valued f: the backward pass with upstream gradient df.

    Inputs: f callable on x returning an array of df's shape; x ndarray (restored before returning); df upstream;
    h step; order 2 or 4.
    Returns grad of x's shape.
    """
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        grad[ix] = np.sum(_derivative(lambda: f(x), x, ix, h, order) * df)
    return grad


def grad_check_sparse(f, x, analytic_grad, num_checks=10, h=1e-5, verbose=True):
    """Compare analytic_grad with centred differences of the scalar f at num_checks random elements of x.

    Returns the list of relative errors (printed too when verbose).
    """
    errors = []
    for _ in range(num_checks):
        ix = tuple(randrange(n) for n in x.shape)
        numeric = _derivative(lambda: f(x), x, ix, h, 2)
        analytic = analytic_grad[ix]
        error = abs(numeric - analytic) / max(1e-12, abs(numeric) + abs(analytic))
        errors.append(error)
        if verbose:
            print(f"numerical: {numeric:f} analytic: {analytic:f}, relative error: {error:e}")
    return errors
