"""Checks for plugin authors (and for dpnet's own layers): call them from your tests.

- ``check_layer(layer)``: gradient-checks a ``dpnet.Layer`` of any kind in float64 against centred differences and
  checks shapes, dtypes (a float32 input stays float32) and that inputs are not modified; for kind ``"layer"`` also
  init, parameter gradients, state and a deterministic test mode.
- ``check_model(model)``: gradient-checks every parameter of a whole model (``dpnet.models.Sequential``,
  ``FullyConnectedNet``, a plugin's) in float64.
- ``check_update_rule(rule)``: checks the signature ``rule(w, dw, config=None) -> (next_w, config)``, that ``w`` and
  ``dw`` are not modified, that hyper-parameters and all state live in the config (a run resumed from a copy of the
  config matches the uninterrupted run, as a checkpoint needs), that the rule decreases a convex quadratic, and that
  its in-place variant ``rule.in_place``, if it has one, agrees with it.
- ``check_plugin(name)``: the plugin is installed and loaded through its entry point, and all of the above pass for
  every layer and rule it provides.

Each raises an ``AssertionError`` saying what is wrong: which gradient is off and by how much, which step of the
contract was broken. The layer and model checks live in ``dpnet.plugins.testing_layers``.
"""

import copy
import inspect

import numpy as np

from . import registry
from .records import Layer, signature_problem
from .testing_layers import check_array, fail_check, check_unchanged, check_kind, check_model, gradient_error

__all__ = ["check_layer", "check_model", "check_plugin", "check_update_rule", "gradient_error"]

# Types an update rule may keep in its config (what a checkpoint can save).
_CONFIG_TYPES = (np.ndarray, np.generic, bool, int, float, str, type(None))


def check_layer(layer, *, x=None, seed=0, tol=1e-7, h=1e-5, in_dim=None, options=None):
    """Gradient-check a layer of any kind, in float64, and check its contract.

    Inputs:
    - layer: a ``dpnet.Layer`` (e.g. ``dpnet.registry.get_layer("activation", "swish")``)
    - x: the input to check at (activation: any shape; normalization: (N, D); loss: scores (N, C); layer: (N,
      *in_dim)); by default a random one (activations and layers: uniform in [-3, 3], away from 0). Pass your own
      to stay away from other kinks.
    - seed: of the random inputs, upstream gradients, init's rng and the state's rng
    - tol: largest relative error allowed, ||analytic - numerical|| / (||analytic|| + ||numerical||)
    - h: step of the centred differences
    - in_dim, options (kind "layer" only): one sample's input shape and the layer's keyword options to check with.
      Without them: in_dim is x's (N, *in_dim) if x is given, else ``layer.init.check_in_dim`` if the init function
      declares one, else (7,); options are ``layer.init.check_options`` if declared, else none (dpnet's affine is
      checked with units=5, dropout with keep=0.6). Declare both on a layer whose init needs options or a particular
      input shape, so that ``check_plugin`` and dpnet's own test suite can check it:
      ``init.check_in_dim = (3, 8, 8)``, ``init.check_options = {"units": 4}``.

    A layer of kind "layer" is initialized, run forward and backward in float32 and in float64 (with batches of 5
    samples), each time checking that init returns ``(params, out_dim)`` with every parameter of the dtype asked
    for; that out is (N, *out_dim), dx of x's shape and grads have exactly params' keys and shapes, all of the
    input's dtype; that neither x nor params are modified; that everything the layer keeps in its state (keys other
    than "mode", "options", "rng", "reducer") is a float array, as checkpoints save only those; that two forward
    passes in "test" mode (after one in "train" mode, with the same state) give identical outputs; and, if backward
    takes ``need_dx`` or ``grads_out``, that it gives the same gradients with them (grads_out arrays are NaN-filled
    beforehand: they must be overwritten). Then dx
    and every parameter's gradient are checked against centred differences in float64. The state is as Sequential
    gives it: ``{"mode", "options", "rng"}``, ``"rng"`` a ``numpy.random.default_rng(seed)`` made afresh for every
    train-mode evaluation, so that a layer drawing random numbers (dropout) is the same function at each one.

    Raises AssertionError naming the layer and what is wrong (e.g. "gradient dgamma is off: relative error 3.1e-02
    > 1e-07 ...", "layer 'prelu': grads['alpha'] has shape (1,), expected (7,)"). Returns None.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer expects a dpnet.Layer, got {type(layer).__name__} (look one up with "
                        f"dpnet.registry.get_layer(kind, name))")
    check_kind(layer, f"{layer.kind} {layer.name!r}", x, seed=seed, tol=tol, h=h, in_dim=in_dim, options=options)


def _call_rule(rule, what, w, dw, config, step=""):
    w0, dw0 = w.copy(), dw.copy()
    result = rule(w, dw) if config is None else rule(w, dw, config)
    if not isinstance(result, tuple) or len(result) != 2:
        fail_check(what, f"must return a tuple (next_w, config){step}, got {type(result).__name__} {result!r:.80}")
    next_w, config = result
    check_array(what, "next_w", next_w, w.shape, w.dtype)
    if not isinstance(config, dict):
        fail_check(what, f"must return its config dict{step}, got {type(config).__name__}")
    check_unchanged(what, "w", w, w0)
    check_unchanged(what, "dw", dw, dw0)
    if not np.all(np.isfinite(next_w)):
        fail_check(what, f"produced non-finite weights{step}")
    for key, value in config.items():
        if not isinstance(value, _CONFIG_TYPES):
            fail_check(what, f"keeps {key!r} of type {type(value).__name__} in its config: keep only NumPy arrays and "
                        f"scalars there, so that checkpoints can save the rule's state")
    return next_w, config


def _snapshot(config):
    """What a checkpoint round trip gives back: copied arrays, NumPy scalars as Python scalars."""
    return {k: v.item() if isinstance(v, np.generic) else copy.deepcopy(v) for k, v in config.items()}


def check_update_rule(rule, *, config=None, steps=200, seed=0):
    """Check an update rule against dpnet's contract.

    Inputs:
    - rule: ``rule(w, dw, config=None) -> (next_w, config)`` (e.g. ``dpnet.registry.get_update_rule("lion")``)
    - config: hyper-parameters to check with (default: the rule's own defaults)
    - steps: steps taken on the convex quadratic
    - seed: of the random problem

    Checks, in order: the signature; a first call without config returns ``(next_w, config)`` with next_w of w's
    shape and dtype (float32 stays float32) and a dict; w and dw are not modified; a ``learning_rate`` given in the
    config is kept there (the Solver decays it); the config holds only arrays and scalars; all state lives in the
    config (continuing from a copy of the config gives exactly what the uninterrupted run gives); the rule decreases
    ``f(w) = 0.5 * sum(a * (w - c)**2)`` by at least 0.1% in ``steps`` steps; if the rule has an in-place variant
    ``rule.in_place(w, dw, config=None) -> (w, config)`` (which the Solver uses for the parameters it
    owns), that it updates w itself, leaves dw alone and agrees with the rule step by step to rounding (relative
    1e-12), and, if it takes the keyword ``w_scale`` (the Solver's weight decay, applied within the rule's own pass),
    that ``in_place(w, dw, config, w_scale=s)`` is bit for bit ``w *= s`` followed by ``in_place(w, dw, config)``;
    if the rule declares ``rule.elementwise = True`` (which lets the Solver shard its state over processes),
    that updating flat segments of w (each with its own config) gives bit for bit what updating the whole gives.
    Raises AssertionError saying which failed. Returns None.
    """
    what = f"update rule {getattr(rule, '__name__', repr(rule))!r}"
    problem = signature_problem(rule, ("w", "dw", "None"), "rule", keyword="config")
    if problem is None:
        problem = signature_problem(rule, ("w", "dw"), "rule")
    if problem:
        fail_check(what, problem.replace("rule(w, dw)", "rule(w, dw, config=None)"))
    rng = np.random.default_rng(seed)
    user = dict(config or {})

    for dtype in (np.float32, np.float64):
        w, dw = rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
        _call_rule(rule, what, w, dw, None if not user else copy.deepcopy(user), " when called without a config")
    if "learning_rate" not in _call_rule(rule, what, w, dw, None)[1]:
        fail_check(what, "must keep its learning_rate in the config (set a default with config.setdefault): the "
                    "Solver decays it there")
    lr = 0.5 * _call_rule(rule, what, w, dw, None)[1]["learning_rate"]
    _, cfg = _call_rule(rule, what, w, dw, {**copy.deepcopy(user), "learning_rate": lr})
    if cfg.get("learning_rate") != lr:
        fail_check(what, f"was given learning_rate={lr!r} in its config but returned learning_rate="
                    f"{cfg.get('learning_rate')!r}: hyper-parameters in the config must be honoured and kept")

    # A convex quadratic f(w) = 0.5 * sum(a * (w - c)**2), gradient a * (w - c).
    a, c = rng.uniform(0.5, 2.0, size=(4, 5)), rng.standard_normal((4, 5))
    start = c + rng.standard_normal((4, 5))

    def f(w):
        return 0.5 * float(np.sum(a * (w - c) ** 2))

    def run(w, cfg, first, last):
        for t in range(first, last):
            w, cfg = _call_rule(rule, what, w, a * (w - c), cfg, f" at step {t + 1}")
        return w, cfg

    half = steps // 2
    w_half, cfg_half = run(start.copy(), copy.deepcopy(user), 0, half)
    saved_w, saved_cfg = w_half.copy(), _snapshot(cfg_half)
    w_end, _ = run(w_half, cfg_half, half, steps)
    w_resumed, _ = run(saved_w, saved_cfg, half, steps)
    if not np.allclose(w_resumed, w_end, rtol=1e-12, atol=0):
        fail_check(what, f"keeps state outside its config: continuing from a copy of the config after step {half} gave "
                    f"weights differing by up to {np.max(np.abs(w_resumed - w_end)):.3g} from the uninterrupted "
                    f"run (keep every piece of state in the config dict, so that checkpoints and per-parameter "
                    f"configs work)")
    f_start, f_end = f(start), f(w_end)
    if not f_end <= (1 - 1e-3) * f_start:
        fail_check(what, f"does not decrease a convex quadratic: f went from {f_start:.6g} to {f_end:.6g} in {steps} "
                    f"steps (config {user or 'defaults'}); check the sign of the step, or pass a config with a "
                    f"larger learning_rate")
    in_place = getattr(rule, "in_place", None)
    if in_place is not None:
        _check_in_place(rule, in_place, what, user, lambda w: a * (w - c), start)
        if "w_scale" in _parameters(in_place):
            _check_w_scale(in_place, what, user, lambda w: a * (w - c), start)
    if getattr(rule, "elementwise", False):
        if in_place is None:
            fail_check(what, "declares rule.elementwise = True without an in-place variant: sharding its state over "
                        "processes (Solver(shard_optimizer=True)) applies rule.in_place to segments")
        _check_elementwise(in_place, what, user, lambda w: a * (w - c), start)


def _check_elementwise(in_place, what, user, grad, start, steps=20):
    """A rule declaring `elementwise` computes the same, bit for bit, on a whole array and on flat segments of it
    (each with its own config), as it does when its state is sharded over processes."""
    whole_w, whole_config = start.copy(), copy.deepcopy(user)
    flat = start.copy().reshape(-1)
    cut = [0, 3, 3, 11, flat.size]  # uneven segments, and an empty one (a process with no part of the parameter)
    configs = [copy.deepcopy(user) for _ in cut[1:]]
    for t in range(steps):
        dw = grad(whole_w)
        whole_w, whole_config = in_place(whole_w, dw, whole_config)
        dw_flat = grad(flat.reshape(start.shape)).reshape(-1)
        for (lo, hi), config in zip(zip(cut[:-1], cut[1:]), configs):
            in_place(flat[lo:hi], dw_flat[lo:hi], config)
        if not np.array_equal(flat, whole_w.reshape(-1)):
            fail_check(what, f"declares rule.elementwise = True but its update of flat segments differs from its "
                             f"update of the whole array by up to {np.max(np.abs(flat - whole_w.reshape(-1))):.3g} "
                             f"at step {t + 1}: an element's update must depend on that element alone")


def _parameters(function):
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):  # no inspectable signature
        return {}


def _check_w_scale(in_place, what, user, grad, start, steps=20):
    """in_place(w, dw, config, w_scale=s) is `w *= s` then in_place(w, dw, config), bit for bit."""
    scaled, scaled_config = start.copy(), copy.deepcopy(user)
    folded, folded_config = start.copy(), copy.deepcopy(user)
    for t in range(steps):
        scale = 1 - 0.01 * (t + 1)
        dw = grad(scaled)
        scaled *= scale
        scaled_config = in_place(scaled, dw, scaled_config)[1]
        result = in_place(folded, dw, folded_config, w_scale=scale)
        if not (isinstance(result, tuple) and len(result) == 2 and result[0] is folded):
            fail_check(what, f"its in-place variant must return (w, config) with w itself when given w_scale "
                             f"(step {t + 1})")
        folded_config = result[1]
        if not np.array_equal(folded, scaled):
            fail_check(what, f"its in-place variant takes w_scale but does not compute `w *= w_scale` and then the "
                        f"update: they differ by up to {np.max(np.abs(folded - scaled)):.3g} at step {t + 1}")


def _check_in_place(rule, in_place, what, user, grad, start, steps=20):
    """rule.in_place(w, dw, config) -> (w, config) updates w itself and computes what rule computes."""
    pure_w, pure_config = start.copy(), copy.deepcopy(user)
    w, config = start.copy(), copy.deepcopy(user)
    for t in range(steps):
        pure_w, pure_config = rule(pure_w, grad(pure_w), pure_config)
        dw = grad(w)
        dw0 = dw.copy()
        result = in_place(w, dw, config)
        if not (isinstance(result, tuple) and len(result) == 2 and result[0] is w):
            fail_check(what, f"its in-place variant must return (w, config) with w itself, updated in place "
                             f"(step {t + 1})")
        config = result[1]
        check_unchanged(what, "dw", dw, dw0)
        if not np.allclose(w, pure_w, rtol=1e-12, atol=0):
            fail_check(what, f"its in-place variant differs from the rule by up to {np.max(np.abs(w - pure_w)):.3g} at "
                        f"step {t + 1}: rule.in_place must compute what the rule computes")


def check_plugin(name):
    """Check that the plugin ``name`` (its entry-point name) is installed and loaded, and run ``check_layer`` and
    ``check_update_rule`` over everything it provides, layers of every kind: a layer of kind ``"layer"`` with the
    input shape and options its init declares (``init.check_in_dim``, ``init.check_options``; see check_layer).
    Returns its ``dpnet.registry.PluginInfo``."""
    infos = {info.name: info for info in registry.list_plugins()}
    info = infos.get(name)
    if info is None:
        raise AssertionError(f"plugin {name!r} is not installed: no entry point {name!r} in the group "
                             f"{registry.ENTRY_POINT_GROUP!r} (installed plugins: {', '.join(sorted(infos))}); "
                             f"install your distribution, e.g. `pip install -e .`")
    if info.status != "loaded":
        raise AssertionError(f"plugin {name!r} is {info.status}: {info.reason}")
    if not any(info.layers.values()) and not info.update_rules:
        raise AssertionError(f"plugin {name!r} ({info.describe()}) provides no layers and no update rules")
    for kind, names in info.layers.items():
        for layer_name in names:
            check_layer(registry.get_layer(kind, layer_name))
    for rule_name in info.update_rules:
        check_update_rule(registry.get_update_rule(rule_name))
    return info
