"""dpnet.testing: every registered layer and rule passes (plugins included), and broken ones are caught, each with
a message that says what is wrong."""

import re

import numpy as np
import pytest

from dpnet import layers, optim, registry
from dpnet.registry import Layer
from dpnet.testing import check_layer, check_plugin, check_update_rule, gradient_error

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
        check_layer(Layer("n", "normalization", layers.layernorm_forward, lambda d, c: layers.layernorm_backward(d, c)[0]))
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
    assert info.layers == {"activation": ["fx_softsign"], "normalization": ["fx_scale"], "loss": ["fx_squared"]}
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
