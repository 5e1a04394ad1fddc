"""The layer and model checks of ``dpnet.testing`` (import them from there): gradient checks against centred
differences, and the contract of each layer kind (shapes, dtypes, inputs left alone, state).

- ``check_kind(layer, ...)``: what ``dpnet.testing.check_layer`` runs for one layer
- ``check_model(model, ...)``: gradient-checks a whole model (``Sequential``, ``FullyConnectedNet`` or any model with
  ``params`` and ``loss(X, y) -> (loss, grads)``)
"""

import inspect

import numpy as np

from ..gradient_check import eval_numerical_gradient, eval_numerical_gradient_array
from ..solver_checks import accepts_keyword

__all__ = ["DEFAULT_IN_DIM", "check_kind", "check_model", "gradient_error"]

#: The input shape (one sample's) a layer of kind "layer" is checked on when neither the caller nor the layer says.
DEFAULT_IN_DIM = (7,)

# Keys of a layer's state that Sequential and the Solver put there; everything else is the layer's own.
_GIVEN_STATE = ("mode", "options", "rng", "reducer", "owned_input")


def gradient_error(analytic, numerical):
    """Relative error of a gradient: ||analytic - numerical|| / max(||analytic|| + ||numerical||, 1e-8)."""
    analytic, numerical = np.asarray(analytic, dtype=np.float64), np.asarray(numerical, dtype=np.float64)
    denominator = max(np.linalg.norm(analytic) + np.linalg.norm(numerical), 1e-8)
    return float(np.linalg.norm(analytic - numerical) / denominator)


def fail_check(what, message):
    raise AssertionError(f"{what}: {message}")


def _compare(what, grad_name, analytic, numerical, tol, atol=0.0):
    """Assert that an analytic gradient matches the numerical one (relative error <= tol, or a difference
    ||analytic - numerical|| <= atol); the message says which and by how much."""
    if np.shape(analytic) != np.shape(numerical):
        fail_check(what, f"gradient {grad_name} has shape {np.shape(analytic)}, expected {np.shape(numerical)}")
    if not np.all(np.isfinite(analytic)):
        fail_check(what, f"gradient {grad_name} is not finite: {analytic!r}")
    error = gradient_error(analytic, numerical)
    diff = np.abs(np.asarray(analytic, dtype=np.float64) - numerical)
    if not (error <= tol or np.linalg.norm(diff) <= atol):
        worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
        noise = f" and ||analytic - numerical|| {np.linalg.norm(diff):.2e} > {atol:.2e}" if atol else ""
        fail_check(what, f"gradient {grad_name} is off: relative error {error:.2e} > {tol:.0e}{noise} (worst element "
                    f"{tuple(int(i) for i in worst)}: analytic {np.asarray(analytic)[worst]:.8g}, numerical "
                    f"{numerical[worst]:.8g})")


def _pair(what, result, names, function="forward"):
    if not isinstance(result, tuple) or len(result) != 2:
        fail_check(what, f"{function} must return a tuple {names}, got {type(result).__name__} {result!r:.80}")
    return result


def check_array(what, name, value, shape, dtype):
    if not isinstance(value, np.ndarray):
        fail_check(what, f"{name} must be a NumPy array, got {type(value).__name__}")
    if value.shape != shape:
        fail_check(what, f"{name} has shape {value.shape}, expected {shape}")
    if value.dtype != dtype:
        fail_check(what, f"{name} has dtype {value.dtype} for a {np.dtype(dtype)} input (dtypes must be preserved: a "
                    f"float32 model must not compute in float64)")
    return value


def check_unchanged(what, name, value, original):
    if not np.array_equal(value, original, equal_nan=True):
        fail_check(what, f"modified its input {name} in place (layers and rules must not modify their inputs)")


def _away_from_zero(rng, shape):
    """Uniform in [-3, 3], kept away from 0 (where relu-like layers have a kink the centred differences straddle)."""
    x = rng.uniform(-3, 3, size=shape)
    x[np.abs(x) < 1e-2] = 0.5
    return x


# ----------------------------------------------------------------------------------------------- v1 kinds
def _activation(layer, what, rng, x, tol, h):
    x = np.array(_away_from_zero(rng, (4, 6)) if x is None else x, dtype=np.float64)
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        x0 = xd.copy()
        out, cache = _pair(what, layer.forward(xd), "(out, cache)")
        check_array(what, "out", out, xd.shape, xd.dtype)
        dout = rng.standard_normal(xd.shape).astype(dtype)
        dx = check_array(what, "dx", layer.backward(dout, cache), xd.shape, xd.dtype)
        check_unchanged(what, "x", xd, x0)
    numerical = eval_numerical_gradient_array(lambda v: layer.forward(v)[0], x.copy(), dout, h=h)
    _compare(what, "dx", dx, numerical, tol)


def _normalization(layer, what, rng, x, tol, h):
    if x is None:
        x = 3 * rng.standard_normal((5, 4)) + 2
    x = np.array(x, dtype=np.float64)
    D = x.shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, D), rng.standard_normal(D)
    for dtype in (np.float32, np.float64):
        args = [a.astype(dtype) for a in (x, gamma, beta)]
        originals = [a.copy() for a in args]
        out, cache = _pair(what, layer.forward(*args, {"mode": "train"}), "(out, cache)")
        check_array(what, "out", out, x.shape, dtype)
        dout = rng.standard_normal(x.shape).astype(dtype)
        grads = layer.backward(dout, cache)
        if not isinstance(grads, tuple) or len(grads) != 3:
            fail_check(what, f"backward must return a tuple (dx, dgamma, dbeta), got {type(grads).__name__}")
        for name, grad, arg in zip(("dx", "dgamma", "dbeta"), grads, args):
            check_array(what, name, grad, arg.shape, dtype)
        for name, arg, original in zip(("x", "gamma", "beta"), args, originals):
            check_unchanged(what, name, arg, original)

    # Test mode after training mode, with the same param dict (as a model does).
    param = {"mode": "train"}
    layer.forward(x, gamma, beta, param)
    param["mode"] = "test"
    out, _ = _pair(what, layer.forward(x, gamma, beta, param), "(out, cache)")
    check_array(what, "out (test mode)", out, x.shape, np.float64)
    if not np.all(np.isfinite(out)):
        fail_check(what, "forward in test mode gave non-finite values")

    inputs = {"x": x, "gamma": gamma, "beta": beta}
    for name, grad in zip(("dx", "dgamma", "dbeta"), grads):
        def f(value, name=name):
            values = dict(inputs, **{name[1:]: value})
            return layer.forward(values["x"], values["gamma"], values["beta"], {"mode": "train"})[0]

        numerical = eval_numerical_gradient_array(f, inputs[name[1:]].copy(), dout, h=h)
        _compare(what, name, grad, numerical, tol)


def _loss(layer, what, rng, x, tol, h):
    if x is None:
        x = rng.standard_normal((6, 5))
    scores = np.array(x, dtype=np.float64)
    y = rng.integers(scores.shape[1], size=scores.shape[0])
    for dtype in (np.float32, np.float64):
        s = scores.astype(dtype)
        s0 = s.copy()
        loss, dscores = _pair(what, layer.forward(s, y), "(loss, dscores)")
        if np.ndim(loss) != 0 or not np.isfinite(loss):
            fail_check(what, f"loss must be a finite scalar, got {loss!r:.80}")
        check_array(what, "dscores", dscores, s.shape, s.dtype)
        check_unchanged(what, "scores", s, s0)
    numerical = eval_numerical_gradient(lambda v: layer.forward(v, y)[0], scores.copy(), verbose=False, h=h)
    _compare(what, "dscores", dscores, numerical, tol)


# ----------------------------------------------------------------------------------------------- kind "layer"
def _example(layer, what, x, in_dim, options):
    """The (in_dim, options) to check the layer with: the caller's, else those it declares, else the defaults."""
    init = layer.init
    if in_dim is None:
        in_dim = np.shape(x)[1:] if x is not None else getattr(init, "check_in_dim", DEFAULT_IN_DIM)
    in_dim = tuple(int(d) for d in np.atleast_1d(in_dim))
    if x is not None and (np.ndim(x) < 1 or tuple(np.shape(x)[1:]) != in_dim):
        raise ValueError(f"check_layer: x has shape {np.shape(x)}, expected (N, *{in_dim}) for in_dim={in_dim}")
    if options is None:
        options = getattr(init, "check_options", None) or {}
    options = dict(options)
    problem = None
    try:
        inspect.signature(init).bind(in_dim, None, None, **options)
    except TypeError as exc:
        problem = str(exc)
    except ValueError:  # no inspectable signature: let the call say what is wrong
        pass
    if problem:
        fail_check(what, f"init cannot be called as init(in_dim, rng, dtype{''.join(f', {k}=...' for k in options)}) "
                    f"({problem}): pass the options to check with, check_layer(layer, options={{...}}), or declare "
                    f"them on the init function, init.check_options = {{...}}")
    return in_dim, options


def _init(layer, what, in_dim, options, seed, dtype):
    """Call init and check what it returns: (params, out_dim) with params a dict of arrays of `dtype`."""
    result = _pair(what, layer.init(in_dim, np.random.default_rng(seed), np.dtype(dtype), **options),
                   "(params, out_dim)", "init")
    params, out_dim = result
    if not isinstance(params, dict):
        fail_check(what, f"init must return its params as a dict name -> array, got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            fail_check(what, f"init returned param {key!r} as {type(value).__name__}: params must map names (str) to "
                        f"NumPy arrays")
        if value.dtype != dtype:
            fail_check(what, f"init returned param {key!r} of dtype {value.dtype} when asked for {np.dtype(dtype)} "
                        f"(create every parameter with .astype(dtype) or dtype=dtype)")
    try:
        out_dim = tuple(int(d) for d in out_dim)
    except TypeError:
        fail_check(what, f"init must return out_dim as a tuple (one sample's output shape), got {out_dim!r:.80}")
    return params, out_dim


def _backward(layer, what, dout, cache, params, in_shape, dtype, **keywords):
    """Call backward and check (dx, grads): dx of x's shape, grads with exactly params' keys, shapes and dtype."""
    dx, grads = _pair(what, layer.backward(dout, cache, **keywords), "(dx, grads)", "backward")
    if dx is not None or keywords.get("need_dx", True):
        check_array(what, "dx", dx, in_shape, dtype)
    if not isinstance(grads, dict):
        fail_check(what, f"backward must return its grads as a dict, got {type(grads).__name__}")
    if set(grads) != set(params):
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        fail_check(what, "backward's grads must have exactly the keys of params " + str(sorted(params)) + ": "
              + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                             f"extra {extra}" if extra else "") if part))
    for key, value in params.items():
        check_array(what, f"grads[{key!r}]", grads[key], value.shape, dtype)
    return dx, grads


def _check_state(what, state):
    """Everything a layer keeps in its state must be a float array: the Solver saves, restores and syncs those."""
    for key, value in state.items():
        if key in _GIVEN_STATE:
            continue
        if not isinstance(value, np.ndarray):
            fail_check(what, f"keeps {key!r} of type {type(value).__name__} in its state: keep only float NumPy arrays "
                        f"there (checkpoints save and restore those, and nothing else)")
        if value.dtype.kind != "f":
            fail_check(what, f"keeps {key!r} in its state as a {value.dtype} array: keep only float arrays there "
                        f"(checkpoints save and restore those, and nothing else)")


def _layer(layer, what, rng, x, tol, h, in_dim=None, options=None, seed=0):
    in_dim, options = _example(layer, what, x, in_dim, options)
    x = np.array(_away_from_zero(rng, (5, *in_dim)) if x is None else x, dtype=np.float64)

    def state(mode="train"):
        """A fresh state as Sequential gives it, with a freshly seeded rng: the same masks at every call."""
        return {"mode": mode, "options": dict(options), "rng": np.random.default_rng(seed)}

    for dtype in (np.float32, np.float64):  # float64 last: its params, dout, dx and grads are gradient-checked below
        params, out_dim = _init(layer, what, in_dim, options, seed, dtype)
        xd = x.astype(dtype)
        inputs = {"x": xd, **{f"params[{k!r}]": v for k, v in params.items()}}
        originals = {name: value.copy() for name, value in inputs.items()}

        def unchanged(inputs=inputs, originals=originals):
            for name, value in inputs.items():
                check_unchanged(what, name, value, originals[name])

        train = state()
        out, cache = _pair(what, layer.forward(xd, params, train), "(out, cache)")
        check_array(what, "out", out, (x.shape[0], *out_dim), dtype)
        unchanged()
        dout = rng.standard_normal(out.shape).astype(dtype)
        dx, grads = _backward(layer, what, dout, cache, params, x.shape, dtype)
        unchanged()
        _check_state(what, train)
        _check_fast_backward(layer, what, xd, dout, params, grads, state, dtype)

        train["mode"] = "test"  # after training, as a model evaluates: the same state, the rng not reseeded
        first = check_array(what, "out (test mode)", _pair(what, layer.forward(xd, params, train), "(out, cache)")[0],
                       out.shape, dtype).copy()
        second = layer.forward(xd, params, train)[0]
        if not np.array_equal(first, second, equal_nan=True):
            fail_check(what, f"is not deterministic in test mode: two forward passes on the same input differ by up to "
                        f"{np.nanmax(np.abs(first.astype(np.float64) - second)):.3g} (draw random numbers only in "
                        f"train mode)")
        if not np.all(np.isfinite(first)):
            fail_check(what, "forward in test mode gave non-finite values")
        unchanged()
        _check_state(what, train)

    numerical = eval_numerical_gradient_array(lambda v: layer.forward(v, params, state())[0], x.copy(), dout, h=h)
    _compare(what, "dx", dx, numerical, tol)
    for key in params:
        def f(value, key=key):
            return layer.forward(x, {**params, key: value}, state())[0]

        numerical = eval_numerical_gradient_array(f, params[key].copy(), dout, h=h)
        _compare(what, f"grads[{key!r}]", grads[key], numerical, tol)


def _check_fast_backward(layer, what, x, dout, params, grads, state, dtype):
    """backward(..., need_dx=False) and backward(..., grads_out=arrays), if it takes them (Sequential passes them),
    give the same gradients; grads_out arrays start as NaN, as the old values a model's buffers hold may be anything."""
    for keyword in ("need_dx", "grads_out"):
        if not accepts_keyword(layer.backward, keyword):
            continue
        value = False if keyword == "need_dx" else {k: np.full_like(v, np.nan) for k, v in params.items()}
        cache = layer.forward(x, params, state())[1]
        _, fast = _backward(layer, what, dout, cache, params, x.shape, dtype, **{keyword: value})
        for key, grad in grads.items():
            if not _same(fast[key], grad):
                call, hint = (("need_dx=False", "") if keyword == "need_dx" else
                              ("grads_out={...}", " (a grads_out array must be overwritten, not added to)"))
                fail_check(what, f"backward(dout, cache, {call}) gives grads[{key!r}] differing from backward(dout, "
                            f"cache){hint}")


def _same(a, b):
    """Whether a equals b to rounding (1000 ulps of b's dtype, relative to b's largest element): the same gradient
    computed along another path."""
    scale = 1e3 * np.finfo(b.dtype).eps * max(float(np.max(np.abs(b), initial=0)), np.finfo(b.dtype).tiny)
    return bool(np.all(np.abs(a - b) <= scale))


def check_kind(layer, what, x=None, *, seed=0, tol=1e-7, h=1e-5, in_dim=None, options=None):
    """Run the checks of the layer's kind (see dpnet.testing.check_layer); in_dim and options are for kind "layer"."""
    rng = np.random.default_rng(seed)
    if layer.kind == "layer":
        _layer(layer, what, rng, x, tol, h, in_dim=in_dim, options=options, seed=seed)
    elif in_dim is not None or options is not None:
        raise TypeError(f"check_layer: in_dim and options are for layers of kind 'layer', not a {layer.kind}")
    else:
        {"activation": _activation, "normalization": _normalization, "loss": _loss}[layer.kind](
            layer, what, rng, x, tol, h)


# ----------------------------------------------------------------------------------------------- whole models
def _model_inputs(model, X, y, batch, rng):
    if X is None:
        shape = getattr(model, "input_shape", None) or (int(model.input_dim),)
        X = rng.standard_normal((batch, *shape))
    X = np.asarray(X, dtype=np.float64)
    if y is None:
        classes = getattr(model, "num_classes", None) or model.loss(X).shape[1]
        y = rng.integers(classes, size=X.shape[0])
    return X, np.asarray(y)


def _model_states(model):
    """The dicts a model keeps its layers' state and dropout settings in (restored after the check)."""
    states = [s for s in getattr(model, "bn_params", None) or [] if isinstance(s, dict)]
    dropout = getattr(model, "dropout_param", None)
    return states + [dropout] if isinstance(dropout, dict) else states


def check_model(model, X=None, y=None, *, seed=0, tol=1e-7, h=1e-5, order=2, batch=4, max_checks=200):
    """Gradient-check a whole model, in float64: every parameter's gradient against centred differences of its loss.

    Inputs:
    - model: with ``params`` (name -> float64 array) and ``loss(X, y) -> (loss, grads)``, e.g.
      ``Sequential(spec, input_dim=(6,), dtype=np.float64)`` or ``FullyConnectedNet(..., dtype=np.float64)``
    - X, y: where to check; by default ``batch`` random samples of the model's ``input_shape`` (else
      ``(input_dim,)``), standard normal, and random labels below its ``num_classes`` (else the width of its scores)
    - seed: of the random inputs, the sampled elements and the layers' random numbers
    - tol: largest relative error allowed per parameter, ||analytic - numerical|| / (||analytic|| + ||numerical||)
    - h, order: step and order (2 or 4) of the centred differences (see dpnet.gradient_check)
    - max_checks: a parameter with more elements is checked at that many random elements only (a sparse check)

    A gradient also passes when ||analytic - numerical|| is within the rounding noise of the centred differences,
    10 * sqrt(elements checked) * 2.2e-16 * max(|loss|, 1) / h: a gradient that is zero in exact arithmetic (a bias
    before batchnorm) has a numerical estimate of pure noise, and no relative error to speak of. A relu input within
    h of its kink makes any gradient check fail; beware of exact zeros, as in a model with zero biases where dropout
    or dead units zero all of a sample's inputs to a layer: check at other X or seed, or with wider layers.

    Every loss evaluation is in "train" mode with every layer's state given a freshly seeded ``"rng"`` (and the
    model's ``dropout_param``, if any): dropout draws the same masks at every evaluation. The model's states
    (running statistics) are restored afterwards, and so are its parameters. Also checks that the loss is a finite
    scalar, that ``grads`` has exactly the keys and shapes of ``params``, and, if ``loss`` takes ``grads=``, that
    gradients written into given arrays (NaN beforehand) are the same. Raises AssertionError naming the parameter and
    the error; ValueError for a model that is not float64. Returns None.
    """
    what = f"model {type(model).__name__}"
    params = model.params
    wrong = {k: v.dtype for k, v in params.items() if v.dtype != np.float64}
    if wrong:
        raise ValueError(f"check_model needs a float64 model (build it with dtype=np.float64): parameters "
                         f"{', '.join(f'{k} ({t})' for k, t in wrong.items())} are not float64")
    rng = np.random.default_rng(seed)
    X, y = _model_inputs(model, X, y, batch, rng)
    states = _model_states(model)
    saved = [{k: (v, v.copy() if isinstance(v, np.ndarray) else None) for k, v in s.items()} for s in states]

    def loss(**keywords):
        for i, s in enumerate(states):
            s["rng"] = np.random.default_rng([seed, i])
        return model.loss(X, y, **keywords)

    try:
        value, grads = _pair(what, loss(), "(loss, grads)", "loss(X, y)")
        if np.ndim(value) != 0 or not np.isfinite(value):
            fail_check(what, f"loss must be a finite scalar, got {value!r:.80}")
        if not isinstance(grads, dict) or set(grads) != set(params):
            fail_check(what, f"grads must have exactly the keys of params {sorted(params)}, got "
                        f"{sorted(grads) if isinstance(grads, dict) else type(grads).__name__}")
        grads = {k: check_array(what, f"grads[{k!r}]", g, params[k].shape, np.float64).copy() for k, g in grads.items()}
        if accepts_keyword(model.loss, "grads"):
            given = loss(grads={k: np.full_like(v, np.nan) for k, v in params.items()})[1]
            for key in params:
                if not _same(given[key], grads[key]):
                    fail_check(what, f"loss(X, y, grads=arrays) gives grads[{key!r}] differing from loss(X, y)")
        noise = 10 * np.finfo(np.float64).eps * max(abs(float(value)), 1.0) / h
        for key, w in params.items():
            name, analytic = f"grads[{key!r}]", grads[key]
            if w.size <= max_checks:
                numerical = eval_numerical_gradient(lambda _: loss()[0], w, verbose=False, h=h, order=order)
            else:
                picks = rng.choice(w.size, size=max_checks, replace=False)
                numerical = np.empty(max_checks)
                for j, index in enumerate(zip(*np.unravel_index(picks, w.shape))):
                    element = w[tuple(slice(i, i + 1) for i in index)]  # a view: perturbing it perturbs w
                    numerical[j] = eval_numerical_gradient(lambda _: loss()[0], element, verbose=False, h=h,
                                                           order=order).item()
                name, analytic = f"{name} (at {max_checks} random elements)", analytic.reshape(-1)[picks]
            _compare(what, name, analytic, numerical, tol, atol=noise * np.sqrt(numerical.size))
    finally:
        for s, before in zip(states, saved):  # the same objects, holding the same values, as before
            s.clear()
            for key, (value, copy) in before.items():
                if copy is not None and value.flags.writeable:
                    np.copyto(value, copy)
                s[key] = value
