"""dpnet-contrib's own tests: every layer and rule passes dpnet.testing, found through the entry point."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpnet import registry, testing
import dpnet_contrib
from dpnet_contrib import activations, optim

ACTIVATIONS = ["leaky_relu", "elu", "gelu", "tanh"]
LAYERS = ["prelu", "maxout", "residual", "lowrank"]  # kind "layer": tests/test_contrib_layers.py
RULES = ["nesterov", "adagrad", "adamw"]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.delenv("DPNET_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    yield
    registry.reset()


def test_the_plugin_provides_what_the_readme_says():
    info = testing.check_plugin("contrib")  # loaded, and every layer and rule passes the checks
    assert info.distribution == "dpnet-contrib"
    assert info.layers["activation"] == sorted(ACTIVATIONS)
    assert info.layers["layer"] == sorted(LAYERS)
    assert info.update_rules == sorted(RULES)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_gradients(name):
    layer = registry.get_layer("activation", name)
    assert "dpnet-contrib" in registry.available("activation")[name]
    testing.check_layer(layer)
    # also far out on both sides, where overflow or saturation would show
    testing.check_layer(layer, x=np.array([[-30.0, -8.0, -1.5, 1.5, 8.0, 30.0]]))


@pytest.mark.parametrize("name", RULES)
def test_update_rule_contract(name):
    testing.check_update_rule(registry.get_update_rule(name))
    testing.check_update_rule(registry.get_update_rule(name), config={"learning_rate": 1e-1})


@pytest.mark.parametrize("name", RULES)
def test_in_place_variants_compute_the_pure_rules_values_and_can_be_sharded(name):
    from dpnet.parallel import is_shardable

    rule = getattr(optim, name)
    assert is_shardable(rule) and is_shardable(registry.get_update_rule(name))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 7))
    pure_w, pure_config, config = w.copy(), {}, {}
    for _ in range(5):
        dw = rng.standard_normal(w.shape)
        pure_w, pure_config = rule(pure_w, dw, pure_config)
        same, config = rule.in_place(w, dw, config)
        assert same is w
        np.testing.assert_array_equal(w, pure_w)  # the same operations in the same order: bit for bit
    for key, value in pure_config.items():
        np.testing.assert_array_equal(config[key], value, err_msg=key)


def test_activation_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert np.allclose(activations.leaky_relu_forward(x)[0], [-0.02, -0.005, 0.0, 0.5, 2.0])
    assert np.allclose(activations.elu_forward(x)[0], [np.exp(-2) - 1, np.exp(-0.5) - 1, 0.0, 0.5, 2.0])
    assert np.allclose(activations.tanh_forward(x)[0], np.tanh(x))
    # GELU (tanh approximation) is within 1e-3 of the exact x * Phi(x)
    from math import erf, sqrt

    exact = np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in x])
    assert np.max(np.abs(activations.gelu_forward(x)[0] - exact)) < 1e-3
    assert activations.elu_forward(np.array([1000.0]))[0][0] == 1000.0  # no overflow warning or inf


def test_float32_stays_float32():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    for name in ACTIVATIONS:
        layer = registry.get_layer("activation", name)
        out, cache = layer.forward(x)
        assert out.dtype == np.float32 and layer.backward(np.ones_like(x), cache).dtype == np.float32, name


def test_adamw_decay_is_decoupled():
    """With a zero gradient Adam does nothing, so AdamW only shrinks w by (1 - lr * weight_decay) per step."""
    w, config = np.array([1.0, -2.0]), {"learning_rate": 0.1, "weight_decay": 0.5}
    for _ in range(3):
        w, config = optim.adamw(w, np.zeros(2), config)
    assert np.allclose(w, np.array([1.0, -2.0]) * (1 - 0.05) ** 3)
    # weight_decay=0 is exactly adam
    from dpnet.optim import adam

    rng = np.random.default_rng(0)
    w, dw = rng.standard_normal(5), rng.standard_normal(5)
    assert np.allclose(optim.adamw(w, dw, {"weight_decay": 0.0})[0], adam(w, dw)[0], rtol=1e-14)


def test_nesterov_and_adagrad_first_steps():
    w, dw = np.array([1.0, 2.0]), np.array([0.5, -4.0])
    # from rest, Nesterov's first step is lr * (1 + mu) * -dw
    assert np.allclose(optim.nesterov(w, dw, {"learning_rate": 0.1, "momentum": 0.9})[0], w - 0.1 * 1.9 * dw)
    # Adagrad's first step is lr * sign(dw)
    assert np.allclose(optim.adagrad(w, dw, {"learning_rate": 0.1})[0], w - 0.1 * np.sign(dw))


def test_found_through_the_entry_point_not_by_import(tmp_path):
    """In a fresh interpreter nobody imports dpnet_contrib, yet its layers are there: pluggy found the entry point."""
    code = (
        "import json, sys\n"
        "from dpnet import registry\n"
        "before = 'dpnet_contrib' in sys.modules\n"
        "provider = registry.available('activation')['gelu']\n"
        "layer = registry.get_layer('activation', 'gelu')\n"
        "print(json.dumps({'before': before, 'after': 'dpnet_contrib' in sys.modules, 'provider': provider,\n"
        "                  'module': layer.forward.__module__, 'rule': registry.available('update_rule')['adamw']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPNET_DISABLE_PLUGIN")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["before"] is False and result["after"] is True
    assert result["provider"] == f"dpnet-contrib {dpnet_contrib.__version__} (plugin 'contrib')"
    assert result["rule"] == result["provider"]
    assert result["module"] == "dpnet_contrib.activations"


def test_disabling_contrib_removes_its_names(monkeypatch):
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "contrib")
    registry.reset()
    assert "gelu" not in registry.available("activation")
    with pytest.raises(registry.UnknownNameError, match=r"Disabled by DPNET_DISABLE_PLUGINS: dpnet-contrib"):
        registry.get_layer("activation", "gelu")
    assert registry.get_layer("activation", "relu").name == "relu"
