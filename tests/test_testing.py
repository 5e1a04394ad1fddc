"""dpnet.testing: every registered layer and rule passes (plugins included), and broken ones are caught, each with
a message that says what is wrong."""

import re
import sys

import numpy as np
import pytest

from dpnet import layers, optim, registry
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.models import AFFINE, DROPOUT, Sequential
from dpnet.registry import Layer
from dpnet.testing import check_layer, check_model, check_plugin, check_update_rule, gradient_error

pytestmark = pytest.mark.usefixtures("clean_registry")


def _registered():
    """(kind, name, provider) of everything registered in this environment: built-ins and installed plugins."""
    registry.reset()
    items = [(kind, name, provider) for kind in (*registry.KINDS, "update_rule")
             for name, provider in registry.available(kind).items()]
    registry.reset()
    return items


@pytest.mark.parametrize("kind, name, provider", _registered(), ids=lambda v: str(v).split(" (")[0])
def test_every_registered_layer_and_rule_passes(kind, name, provider):
    if kind == "update_rule":
        check_update_rule(registry.get_update_rule(name))
    else:
        check_layer(registry.get_layer(kind, name))


def test_builtins_are_covered():
    names = {(kind, name) for kind, name, _ in _registered()}
    assert {("activation", "relu"), ("normalization", "batchnorm"), ("normalization", "layernorm"),
            ("loss", "softmax"), ("loss", "svm"), ("update_rule", "sgd"), ("update_rule", "sgd_momentum"),
            ("update_rule", "rmsprop"), ("update_rule", "adam")} <= names


# ---------------------------------------------------------------------------------------------------- check_layer
def _relu_times(k):
    return Layer("bad", "activation", layers.relu_forward, lambda dout, cache: k * layers.relu_backward(dout, cache))


def test_wrong_activation_gradient_says_which_and_by_how_much():
    with pytest.raises(AssertionError) as info:
        check_layer(_relu_times(1.001))
    message = str(info.value)
    assert re.match(r"activation 'bad': gradient dx is off: relative error 5\.00e-04 > 1e-07 \(worst element "
                    r"\(\d+, \d+\): analytic [-\d.e]+, numerical [-\d.e]+\)$", message), message


def test_wrong_normalization_gradient_names_dgamma():
    def backward(dout, cache):
        dx, dgamma, dbeta = layers.batchnorm_backward(dout, cache)
        return dx, dgamma * 1.1, dbeta

    with pytest.raises(AssertionError, match=r"normalization 'bn': gradient dgamma is off: relative error 4\.76e-02"):
        check_layer(Layer("bn", "normalization", layers.batchnorm_forward, backward))


def test_wrong_normalization_dx_is_caught():
    def backward(dout, cache):  # forgets the terms through the batch mean and variance
        xhat, gamma, std, *_ = cache
        return dout * gamma / std, np.sum(dout * xhat, axis=0), dout.sum(axis=0)

    with pytest.raises(AssertionError, match=r"normalization 'bn': gradient dx is off: relative error"):
        check_layer(Layer("bn", "normalization", layers.batchnorm_forward, backward))


def test_wrong_loss_gradient_names_dscores():
    def loss(scores, y):
        value, dscores = layers.softmax_loss(scores, y)
        return value, dscores * scores.shape[0]  # forgot to average the gradient

    with pytest.raises(AssertionError, match=r"loss 'ce': gradient dscores is off: relative error 7\.14e-01"):
        check_layer(Layer("ce", "loss", loss, None))


def test_float64_upcast_is_caught():
    def forward(x):
        return np.maximum(x, 0).astype(np.float64), x

    with pytest.raises(AssertionError, match="activation 'up': out has dtype float64 for a float32 input"):
        check_layer(Layer("up", "activation", forward, layers.relu_backward))


def test_in_place_modification_is_caught():
    def forward(x):
        np.maximum(x, 0, out=x)
        return x, x.copy()

    with pytest.raises(AssertionError, match="activation 'inplace': modified its input x in place"):
        check_layer(Layer("inplace", "activation", forward, layers.relu_backward))


def test_malformed_results_are_caught():
    with pytest.raises(AssertionError, match=r"activation 'a': forward must return a tuple \(out, cache\), got "
                                             r"ndarray"):
        check_layer(Layer("a", "activation", lambda x: np.maximum(x, 0), layers.relu_backward))
    with pytest.raises(AssertionError, match=r"activation 'a': dx has shape \(4, 6, 1\), expected \(4, 6\)"):
        check_layer(Layer("a", "activation", layers.relu_forward, lambda d, c: layers.relu_backward(d, c)[..., None]))
    with pytest.raises(AssertionError, match=r"loss 'l': loss must be a finite scalar"):
        check_layer(Layer("l", "loss", lambda s, y: (np.ones(len(y)), np.zeros_like(s)), None))
    with pytest.raises(AssertionError, match=r"normalization 'n': backward must return a tuple \(dx, dgamma, dbeta\)"):
        check_layer(Layer("n", "normalization", layers.layernorm_forward,
                          lambda d, c: layers.layernorm_backward(d, c)[0]))
    with pytest.raises(TypeError, match="check_layer expects a dpnet.Layer, got str"):
        check_layer("relu")


def test_custom_input_and_tolerance():
    kinked = Layer("relu6", "activation", lambda x: (np.clip(x, 0, 6), x),
                   lambda dout, x: np.where((x > 0) & (x < 6), dout, 0))
    check_layer(kinked)  # default inputs in [-3, 3]
    with pytest.raises(AssertionError, match="gradient dx is off"):
        check_layer(kinked, x=np.array([[5.999999, 6.000001, 1.0]]))  # centred differences straddle the kink
    check_layer(_relu_times(1.001), tol=1e-3)
    assert gradient_error(np.ones(3), np.ones(3)) == 0.0
    assert gradient_error(np.zeros(3), np.zeros(3)) == 0.0


# ---------------------------------------------------------------------------------------------------- check_update_rule
def test_builtin_rules_pass_with_their_defaults_and_other_configs():
    for rule in (optim.sgd, optim.sgd_momentum, optim.rmsprop, optim.adam):
        check_update_rule(rule)
        check_update_rule(rule, config={"learning_rate": 1e-1})


def test_rule_without_config_argument():
    def rule(w, dw):
        return w - 0.01 * dw

    with pytest.raises(AssertionError, match=r"update rule 'rule': rule must be callable as rule\(w, dw, "
                                             r"config=None\), but its signature is \(w, dw\)"):
        check_update_rule(rule)

    def required(w, dw, config):  # config must default to None
        return w, config

    with pytest.raises(AssertionError, match=r"update rule 'required': rule must be callable as rule\(w, dw, "
                                             r"config=None\), but its signature is \(w, dw, config\)"):
        check_update_rule(required)


def test_rule_returning_only_w():
    def rule(w, dw, config=None):
        return w - 0.01 * dw

    with pytest.raises(AssertionError, match=r"update rule 'rule': must return a tuple \(next_w, config\) when "
                                             r"called without a config, got ndarray"):
        check_update_rule(rule)


def test_rule_modifying_w_in_place():
    def rule(w, dw, config=None):  # the CS231n assignment's style; dpnet's contract forbids it
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        w -= config["learning_rate"] * dw
        return w, config

    with pytest.raises(AssertionError, match="update rule 'rule': modified its input w in place"):
        check_update_rule(rule)


def test_rule_with_hidden_state():
    velocity = {}

    def momentum(w, dw, config=None):  # state in a closure, not in the config
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        v = velocity.get(w.shape, 0) * 0.9 - config["learning_rate"] * dw
        velocity[w.shape] = v
        return w + v, config

    with pytest.raises(AssertionError, match=r"update rule 'momentum': keeps state outside its config: continuing "
                                             r"from a copy of the config after step 100 gave weights differing"):
        check_update_rule(momentum)


def test_rule_that_ascends():
    def ascent(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        return w + config["learning_rate"] * dw, config

    with pytest.raises(AssertionError, match=r"update rule 'ascent': does not decrease a convex quadratic: f went "
                                             r"from [\d.]+ to [\d.]+ in 200 steps"):
        check_update_rule(ascent)


def test_rule_overriding_learning_rate():
    def stubborn(w, dw, config=None):
        config = {} if config is None else config
        config["learning_rate"] = 1e-2
        return w - config["learning_rate"] * dw, config

    with pytest.raises(AssertionError, match=r"update rule 'stubborn': was given learning_rate=0.005 in its config "
                                             r"but returned learning_rate=0.01"):
        check_update_rule(stubborn)


def test_rule_without_learning_rate_or_with_unsaveable_state():
    def no_lr(w, dw, config=None):
        return w - 0.01 * dw, {} if config is None else config

    with pytest.raises(AssertionError, match="update rule 'no_lr': must keep its learning_rate in the config"):
        check_update_rule(no_lr)

    def listy(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        config["history"] = config.get("history", []) + [1]
        return w - config["learning_rate"] * dw, config

    with pytest.raises(AssertionError, match="update rule 'listy': keeps 'history' of type list in its config: keep "
                                             "only NumPy arrays and scalars there"):
        check_update_rule(listy)


def test_rule_upcasting_float32():
    def upcast(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        return (w - config["learning_rate"] * dw).astype(np.float64), config

    with pytest.raises(AssertionError, match="update rule 'upcast': next_w has dtype float64 for a float32 input"):
        check_update_rule(upcast)


# ---------------------------------------------------------------------------------------------------- check_plugin
def test_check_plugin(install, monkeypatch):
    with pytest.raises(AssertionError, match=r"plugin 'fxgood' is not installed: no entry point 'fxgood' in the "
                                             r"group 'dpnet' \(installed plugins: .*dpnet"):
        check_plugin("fxgood")
    install("good")
    info = check_plugin("fxgood")
    assert info.layers == {"activation": ["fx_softsign"], "normalization": ["fx_scale"], "loss": ["fx_squared"],
                           "layer": []}
    assert info.update_rules == ["fx_signsgd"]
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "fxgood")
    registry.reset()
    with pytest.raises(AssertionError, match="plugin 'fxgood' is disabled: DPNET_DISABLE_PLUGINS lists it"):
        check_plugin("fxgood")


def _sgd_and_its_in_place_variant():
    """A fresh plain sgd rule (a new function each call: tests set attributes on it) and a correct in-place variant."""
    def rule(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        return w - config["learning_rate"] * dw, config

    def in_place(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-2)
        w -= config["learning_rate"] * dw
        return w, config

    return rule, in_place


def test_in_place_variant_is_checked_against_the_rule():
    rule, good = _sgd_and_its_in_place_variant()
    rule.in_place = good
    check_update_rule(rule)

    def reallocates(w, dw, config=None):
        return rule(w, dw, config)

    rule.in_place = reallocates
    with pytest.raises(AssertionError, match="in-place variant must return \\(w, config\\) with w itself"):
        check_update_rule(rule)

    def differs(w, dw, config=None):
        w, config = good(w, dw, config)
        w *= 1.001
        return w, config

    rule.in_place = differs
    with pytest.raises(AssertionError, match="in-place variant differs from the rule by up to"):
        check_update_rule(rule)


def test_an_elementwise_declaration_is_checked():
    def scaled(w, dw, config=None):  # steps of a fixed total length: depends on the whole gradient
        config = {} if config is None else config
        config.setdefault("learning_rate", 1e-1)
        w -= config["learning_rate"] * dw / max(1e-12, float(np.linalg.norm(dw)))
        return w, config

    def rule(w, dw, config=None):
        return scaled(np.array(w), dw, config)

    rule.in_place = scaled
    check_update_rule(rule)  # a fine rule, as long as it does not claim to be elementwise
    rule.elementwise = True
    with pytest.raises(AssertionError, match="declares rule.elementwise = True but its update of flat segments"):
        check_update_rule(rule)

    def no_in_place(w, dw, config=None):
        return rule(w, dw, config)

    no_in_place.elementwise = True
    with pytest.raises(AssertionError, match="without an in-place variant"):
        check_update_rule(no_in_place)
    assert all(getattr(registry.get_update_rule(name), "elementwise", False)
               for name in ("sgd", "sgd_momentum", "rmsprop", "adam"))  # and test_every_registered... checks them


def test_a_w_scale_keyword_is_checked():
    rule, in_place = _sgd_and_its_in_place_variant()

    def good(w, dw, config=None, w_scale=1.0):
        w *= w_scale
        return in_place(w, dw, config)

    rule.in_place = good
    check_update_rule(rule)

    def scales_after(w, dw, config=None, w_scale=1.0):  # (w - lr * dw) * s: not the Solver's decoupled decay
        w, config = good(w, dw, config)
        w *= w_scale
        return w, config

    rule.in_place = scales_after
    with pytest.raises(AssertionError, match="takes w_scale but does not compute `w \\*= w_scale` and then"):
        check_update_rule(rule)
    for name in ("sgd", "sgd_momentum", "rmsprop", "adam"):
        check_update_rule(registry.get_update_rule(name))  # the built-ins take w_scale, and pass


# ---------------------------------------------------------------------------------------------------- kind "layer"
def _prelu_init(in_dim, rng, dtype, alpha=0.25):
    return {"alpha": np.full(in_dim, alpha, dtype=dtype)}, tuple(in_dim)


def _prelu_forward(x, params, state):
    alpha = params["alpha"]
    return np.where(x > 0, x, alpha * x), (x, alpha)


def _prelu_grads(dout, x, alpha):
    return np.where(x > 0, dout, alpha * dout), {"alpha": np.where(x > 0, 0, x * dout).sum(axis=0)}


def _prelu_backward(dout, cache):
    return _prelu_grads(dout, *cache)


def _prelu(forward=_prelu_forward, backward=_prelu_backward, init=_prelu_init):
    """A learnable-slope relu (one slope per unit), or a variant of it with one function replaced."""
    return Layer("prelu", "layer", forward, backward, init=init)


def _center_init(in_dim, rng, dtype):
    return {"b": rng.standard_normal(in_dim).astype(dtype)}, tuple(in_dim)


def _center_forward(x, params, state):
    """x minus the batch mean (train) or the running mean (test), plus b: state of its own, like batchnorm's."""
    if state["mode"] == "train":
        mean = x.mean(axis=0)
        state["running_mean"] = 0.9 * state.get("running_mean", np.zeros_like(mean)) + 0.1 * mean
    else:
        mean = state.get("running_mean", np.zeros(x.shape[1:], dtype=x.dtype))
    return x - mean + params["b"], state["mode"]


def _center_backward(dout, mode):
    dx = dout - dout.mean(axis=0) if mode == "train" else dout
    return dx, {"b": dout.sum(axis=0)}


def test_builtin_and_well_formed_layers_pass():
    check_layer(_prelu())
    check_layer(Layer("center", "layer", _center_forward, _center_backward, init=_center_init))
    check_layer(AFFINE)  # checked with units=5, on (7,) inputs
    check_layer(AFFINE, in_dim=(2, 3, 4), options={"units": 3, "weight_scale": 0.1})
    check_layer(DROPOUT, options={"keep": 0.3})  # a function of x only with the rng reseeded at every evaluation
    check_layer(_prelu(), x=np.array([[-2.0, 0.5], [1.5, -0.25]]), options={"alpha": 0.1})


def test_a_layer_declares_its_input_shape_and_options():
    seen = []

    def init(in_dim, rng, dtype, units):
        seen.append((in_dim, units))
        return AFFINE.init(in_dim, rng, dtype, units=units)

    layer = Layer("dense", "layer", AFFINE.forward, AFFINE.backward, init=init)
    with pytest.raises(AssertionError, match=r"layer 'dense': init cannot be called as init\(in_dim, rng, dtype\) "
                                             r"\(missing a required argument: 'units'\): pass the options to check "
                                             r"with, check_layer\(layer, options=\{\.\.\.\}\), or declare them on the "
                                             r"init function, init.check_options = \{\.\.\.\}"):
        check_layer(layer)
    init.check_in_dim, init.check_options = (3, 2, 2), {"units": 4}
    check_layer(layer)
    assert seen == [((3, 2, 2), 4)] * 2  # float32, then float64
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\), expected \(N, \*\(3, 2, 2\)\)"):
        check_layer(layer, x=np.ones((2, 5)), in_dim=(3, 2, 2))
    with pytest.raises(TypeError, match="in_dim and options are for layers of kind 'layer', not a activation"):
        check_layer(_relu_times(1), options={})


def test_wrong_parameter_gradient_is_caught():
    def backward(dout, cache):
        dx, grads = _prelu_backward(dout, cache)
        return dx, {"alpha": grads["alpha"] * 1.01}

    with pytest.raises(AssertionError) as info:
        check_layer(_prelu(backward=backward))
    assert re.match(r"layer 'prelu': gradient grads\['alpha'\] is off: relative error 4\.98e-03 > 1e-07 \(worst "
                    r"element \(\d+,\): analytic [-\d.e]+, numerical [-\d.e]+\)$", str(info.value)), str(info.value)


def test_wrong_dx_is_caught():
    def backward(dout, cache):
        x = cache[0]
        return np.where(x > 0, dout, 0), _prelu_backward(dout, cache)[1]  # forgot the slope of the negative part

    with pytest.raises(AssertionError, match=r"layer 'prelu': gradient dx is off: relative error"):
        check_layer(_prelu(backward=backward))


def test_grads_with_missing_or_extra_keys_are_caught():
    def missing(dout, cache):
        return _prelu_backward(dout, cache)[0], {}

    def extra(dout, cache):
        dx, grads = _prelu_backward(dout, cache)
        return dx, {**grads, "beta": grads["alpha"]}

    with pytest.raises(AssertionError, match=r"layer 'prelu': backward's grads must have exactly the keys of params "
                                             r"\['alpha'\]: missing \['alpha'\]$"):
        check_layer(_prelu(backward=missing))
    with pytest.raises(AssertionError, match=r"layer 'prelu': backward's grads must have exactly the keys of params "
                                             r"\['alpha'\]: extra \['beta'\]$"):
        check_layer(_prelu(backward=extra))
    with pytest.raises(AssertionError, match=r"layer 'prelu': backward must return a tuple \(dx, grads\), got "
                                             r"ndarray"):
        check_layer(_prelu(backward=lambda dout, cache: _prelu_backward(dout, cache)[0]))


def test_wrong_gradient_shape_is_caught():
    def backward(dout, cache):
        dx, grads = _prelu_backward(dout, cache)
        return dx, {"alpha": grads["alpha"].sum(keepdims=True)}  # one shared slope's gradient, for a slope per unit

    with pytest.raises(AssertionError, match=r"layer 'prelu': grads\['alpha'\] has shape \(1,\), expected \(7,\)"):
        check_layer(_prelu(backward=backward))


def test_output_of_the_wrong_shape_is_caught():
    def init(in_dim, rng, dtype):
        return _prelu_init(in_dim, rng, dtype)[0], (in_dim[0] + 1,)  # says one more unit than it gives

    with pytest.raises(AssertionError, match=r"layer 'prelu': out has shape \(5, 7\), expected \(5, 8\)"):
        check_layer(_prelu(init=init))
    with pytest.raises(AssertionError, match=r"layer 'prelu': init must return out_dim as a tuple"):
        check_layer(_prelu(init=lambda in_dim, rng, dtype: (_prelu_init(in_dim, rng, dtype)[0], None)))


def test_float32_not_kept_is_caught():
    def forward(x, params, state):
        out, cache = _prelu_forward(x, params, state)
        return out.astype(np.float64), cache

    def backward(dout, cache):
        dx, grads = _prelu_backward(dout, cache)
        return dx, {"alpha": grads["alpha"].astype(np.float64)}

    with pytest.raises(AssertionError, match="layer 'prelu': out has dtype float64 for a float32 input"):
        check_layer(_prelu(forward=forward))
    with pytest.raises(AssertionError, match=r"layer 'prelu': grads\['alpha'\] has dtype float64 for a float32 "
                                             r"input"):
        check_layer(_prelu(backward=backward))


def test_init_with_params_of_the_wrong_dtype_is_caught():
    def init(in_dim, rng, dtype):
        return {"alpha": np.full(in_dim, 0.25)}, tuple(in_dim)  # always float64

    with pytest.raises(AssertionError, match="layer 'prelu': init returned param 'alpha' of dtype float64 when asked "
                                             "for float32"):
        check_layer(_prelu(init=init))
    with pytest.raises(AssertionError, match="layer 'prelu': init must return its params as a dict"):
        check_layer(_prelu(init=lambda in_dim, rng, dtype: ([np.ones(in_dim, dtype)], tuple(in_dim))))


def test_non_deterministic_test_mode_is_caught():
    def forward(x, params, state):  # noise in both modes: test-mode scores would change from one evaluation to the next
        out, cache = _prelu_forward(x, params, state)
        return out + 1e-3 * state["rng"].standard_normal(out.shape).astype(out.dtype), cache

    with pytest.raises(AssertionError, match=r"layer 'prelu': is not deterministic in test mode: two forward passes "
                                             r"on the same input differ by up to [\d.e-]+ \(draw random numbers only "
                                             r"in train mode\)"):
        check_layer(_prelu(forward=forward))


def test_state_that_is_not_float_arrays_is_caught():
    def counting(x, params, state):
        state["calls"] = np.array(state.get("calls", 0) + 1)  # an int64 array: checkpoints keep float arrays only
        return _prelu_forward(x, params, state)

    def plain(x, params, state):
        state["calls"] = state.get("calls", 0) + 1
        return _prelu_forward(x, params, state)

    with pytest.raises(AssertionError, match="layer 'prelu': keeps 'calls' in its state as a int64 array: keep only "
                                             "float arrays there"):
        check_layer(_prelu(forward=counting))
    with pytest.raises(AssertionError, match="layer 'prelu': keeps 'calls' of type int in its state: keep only float "
                                             "NumPy arrays there"):
        check_layer(_prelu(forward=plain))


def test_modified_params_and_accumulated_grads_out_are_caught():
    def descends(dout, cache):  # an update inside backward: the Solver's job, on arrays the layer must leave alone
        dx, grads = _prelu_backward(dout, cache)
        alpha = cache[1]
        alpha -= 0.1 * grads["alpha"]
        return dx, grads

    with pytest.raises(AssertionError, match=r"layer 'prelu': modified its input params\['alpha'\] in place"):
        check_layer(_prelu(backward=descends))

    def accumulates(dout, cache, need_dx=True, grads_out=None):
        dx, grads = _prelu_backward(dout, cache)
        if grads_out:
            grads_out["alpha"] += grads["alpha"]  # the buffers hold the previous step's gradients
            grads = grads_out
        return dx, grads

    with pytest.raises(AssertionError, match=r"layer 'prelu': backward\(dout, cache, grads_out=\{\.\.\.\}\) gives "
                                             r"grads\['alpha'\] differing from backward\(dout, cache\)"):
        check_layer(_prelu(backward=accumulates))


# ---------------------------------------------------------------------------------------------------- check_model
def test_check_model_passes_on_sequential_and_fully_connected_models():
    spec = [{"layer": "affine", "units": 8}, "batchnorm", "relu", {"layer": "dropout", "keep": 0.8},
            {"layer": "affine", "units": 6}, "layernorm", "relu", {"layer": "affine", "units": 3}]
    model = Sequential(spec, input_dim=(2, 5), reg=0.1, dtype=np.float64, seed=0)
    model.loss(np.ones((3, 2, 5)), np.zeros(3, dtype=int))
    running = model.bn_params[1]["running_mean"]
    before = {name: value.copy() for name, value in model.params.items()}, running.copy()
    check_model(model)
    assert model.bn_params[1]["running_mean"] is running and np.array_equal(running, before[1])  # state restored
    assert "rng" not in model.bn_params[3]
    assert all(np.array_equal(model.params[name], value) for name, value in before[0].items())
    check_model(FullyConnectedNet([8, 6], input_dim=10, num_classes=4, normalization="batchnorm", reg=0.1,
                                  weight_scale=0.3, dropout=0.8, dtype=np.float64, seed=0))
    X = np.random.default_rng(1).standard_normal((5, 10))
    check_model(FullyConnectedNet([6], input_dim=10, num_classes=3, weight_scale=0.3, dtype=np.float64, seed=1),
                X, np.array([0, 1, 2, 1, 0]), order=4, h=1e-4)
    check_model(Sequential([{"layer": "affine", "units": 40}, "relu", {"layer": "affine", "units": 3}],
                           input_dim=(30,), dtype=np.float64, seed=0), max_checks=50)  # affine1.W sparsely


class _Scaled:
    """A model whose gradient of one parameter is scaled by a factor (1: a correct model)."""

    def __init__(self, model, name, factor):
        self.model, self.name, self.factor = model, name, factor
        self.params, self.input_dim, self.num_classes = model.params, model.input_dim, model.num_classes

    def loss(self, X, y=None):
        if y is None:
            return self.model.loss(X)
        loss, grads = self.model.loss(X, y)
        grads[self.name] = grads[self.name] * self.factor
        return loss, grads


def test_check_model_catches_a_wrong_gradient():
    model = FullyConnectedNet([5], input_dim=6, num_classes=3, weight_scale=0.3, dtype=np.float64, seed=0)
    check_model(_Scaled(model, "W2", 1.0))
    with pytest.raises(AssertionError, match=r"model _Scaled: gradient grads\['W2'\] is off: relative error 4\.98e-03 "
                                             r"> 1e-07 and \|\|analytic - numerical\|\| [\d.e-]+ > [\d.e-]+ \(worst "
                                             r"element \(\d+, \d+\)"):
        check_model(_Scaled(model, "W2", 1.01))
    big = FullyConnectedNet([4], input_dim=80, num_classes=3, weight_scale=0.3, dtype=np.float64, seed=0)
    with pytest.raises(AssertionError, match=r"model _Scaled: gradient grads\['W1'\] \(at 20 random elements\) is "
                                             r"off: relative error 4\.98e-03"):
        check_model(_Scaled(big, "W1", 1.01), max_checks=20)


def test_check_model_catches_malformed_models():
    model = FullyConnectedNet([5], input_dim=6, num_classes=3, weight_scale=0.3, dtype=np.float64, seed=0)
    wrapped = _Scaled(model, "W2", 1.0)
    loss = wrapped.loss
    wrapped.loss = lambda X, y=None: (loss(X, y)[0], {k: v for k, v in loss(X, y)[1].items() if k != "b1"})
    with pytest.raises(AssertionError, match=r"model _Scaled: grads must have exactly the keys of params \['W1', 'W2', "
                                             r"'b1', 'b2'\], got \['W1', 'W2', 'b2'\]"):
        check_model(wrapped)

    def accumulating(X, y=None, grads=None):
        fresh = model.loss(X, y)[1]
        if grads is None:
            return 0.0, fresh
        for name in grads:
            grads[name] += fresh[name]
        return 0.0, grads

    wrapped.loss = accumulating
    with pytest.raises(AssertionError, match=r"loss\(X, y, grads=arrays\) gives grads\['W1'\] differing from "
                                             r"loss\(X, y\)"):
        check_model(wrapped)
    with pytest.raises(ValueError, match=r"check_model needs a float64 model \(build it with dtype=np.float64\): "
                                         r"parameters W1 \(float32\), b1 \(float32\)"):
        check_model(FullyConnectedNet([5], input_dim=6, num_classes=3, dtype=np.float32, seed=0))


# ---------------------------------------------------------------------------------------------------- a layer plugin
_LAYER_PLUGIN = '''
"""A plugin with a layer that owns parameters: a learnable-slope relu."""

import numpy as np

from dpnet.registry import Layer, hookimpl


def prelu_init(in_dim, rng, dtype, alpha=0.25):
    return {"alpha": np.full(in_dim, alpha, dtype=dtype)}, tuple(in_dim)


def prelu_forward(x, params, state):
    return np.where(x > 0, x, params["alpha"] * x), (x, params["alpha"])


def prelu_backward(dout, cache):
    x, alpha = cache
    return np.where(x > 0, dout, alpha * dout), {"alpha": np.where(x > 0, 0, x * dout).sum(axis=0)}


def bilinear_init(in_dim, rng, dtype, units):
    return {"U": rng.standard_normal((*in_dim, units)).astype(dtype)}, (units,)


def bilinear_forward(x, params, state):
    z = x @ params["U"]
    return z * z, (x, params["U"], z)


def bilinear_backward(dout, cache):
    x, U, z = cache
    dz = 2 * z * dout
    return dz @ U.T, {"U": x.T @ dz}


bilinear_init.check_options = {"units": 3}


@hookimpl
def dpnet_layers():
    return [Layer("fx_prelu", "layer", prelu_forward, prelu_backward, init=prelu_init),
            Layer("fx_square", "layer", bilinear_forward, bilinear_backward, init=bilinear_init)]
'''


def test_check_plugin_covers_layers_and_their_models(site, clean_registry):
    (site / "dpnetfx_layers.py").write_text(_LAYER_PLUGIN)
    info = site / "dpnetfx_layers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpnetfx-layers\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dpnet]\nfxlayers = dpnetfx_layers\n")
    registry.reset()
    assert check_plugin("fxlayers").layers["layer"] == ["fx_prelu", "fx_square"]
    model = Sequential([{"layer": "affine", "units": 6}, {"layer": "fx_prelu", "alpha": 0.1}, "batchnorm",
                        {"layer": "fx_square", "units": 5}, {"layer": "affine", "units": 3}], input_dim=(4,),
                       dtype=np.float64, seed=0)
    check_model(model)
    del sys.modules["dpnetfx_layers"].bilinear_init.check_options
    with pytest.raises(AssertionError, match=r"layer 'fx_square': init cannot be called as init\(in_dim, rng, "
                                             r"dtype\) \(missing a required argument: 'units'\)"):
        check_plugin("fxlayers")
