"""The plugin registry: built-ins through the hooks, plugins through entry points, failures named and contained.

Plugins here are the distributions in tests/plugin_fixtures, "installed" by writing their dist-info into a temporary
folder on sys.path (see tests/plugin_fixtures/README.md): importlib.metadata and pluggy find them exactly as they find
pip-installed ones.
"""

import re
import sys
import time
import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest

import dpnet
from dpnet import builtins, hookspecs, layers, optim, registry, testing
from dpnet.registry import Layer, PluginError, UnknownNameError

ENV = ("DPNET_DISABLE_PLUGINS", "DPNET_DISABLE_PLUGIN_AUTOLOAD")
BUILTIN = f"dpnet {dpnet.__version__} (built-in)"
pytestmark = pytest.mark.usefixtures("clean_registry")


def relu_layer(name="r", kind="activation", forward=layers.relu_forward, backward=layers.relu_backward, init=None):
    return Layer(name, kind, forward, backward, init=init)


# ---------------------------------------------------------------------------------------------------- built-ins
def test_builtins_are_registered_through_the_hooks():
    assert registry.available("activation")["relu"] == BUILTIN
    assert {k: v for k, v in registry.available("normalization").items() if v == BUILTIN} == {
        "batchnorm": BUILTIN, "layernorm": BUILTIN}
    assert {k for k, v in registry.available("loss").items() if v == BUILTIN} == {"softmax", "svm"}
    assert {k for k, v in registry.available("update_rule").items() if v == BUILTIN} == {
        "sgd", "sgd_momentum", "rmsprop", "adam"}
    relu = registry.get_layer("activation", "relu")
    assert (relu.forward, relu.backward) == (layers.relu_forward, layers.relu_backward)
    assert registry.get_layer("normalization", "batchnorm").forward is layers.batchnorm_forward
    assert registry.get_layer("loss", "svm") == Layer("svm", "loss", layers.svm_loss, None)
    assert registry.get_update_rule("adam") is optim.adam
    pm = registry.get_plugin_manager()
    assert pm.get_plugin("dpnet") is builtins
    assert pm.project_name == "dpnet"


def test_hookimpl_marker_is_dpnets():
    assert registry.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == "dpnet"
    assert {"dpnet_layers", "dpnet_update_rules"} <= set(vars(registry.get_plugin_manager().hook))


def test_dpnet_does_not_name_any_plugin():
    """Plugins are found through entry points only: no module of dpnet mentions the ones we ship."""
    for path in Path(dpnet.__file__).parent.rglob("*.py"):
        assert "dpnet_contrib" not in path.read_text(), path


# ---------------------------------------------------------------------------------------------------- Layer records
def test_layer_is_a_frozen_validated_record():
    layer = relu_layer("relu6")
    assert (layer.name, layer.kind) == ("relu6", "activation")
    with pytest.raises(FrozenInstanceError):
        layer.name = "other"
    assert Layer("l", "loss", layers.softmax_loss).backward is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="activatoin"), "kind 'activatoin' is not one of activation, normalization, loss"),
    (dict(forward="relu_forward"), "forward is not callable (got str)"),
    (dict(backward=None), "a activation layer needs a backward function"),
    (dict(kind="loss", forward=layers.softmax_loss), "a loss layer returns its gradient from forward, so backward "
                                                     "must be None"),
    (dict(kind="normalization"), "forward must be callable as forward(x, gamma, beta, param)"),
    (dict(backward=lambda dout: dout), "backward must be callable as backward(dout, cache)"),
    (dict(name="my relu"), "name 'my relu' is not a valid layer name"),
    (dict(name=""), "name '' is not a valid layer name"),
    (dict(init=lambda in_dim, rng, dtype: ({}, in_dim)), "only layers of kind 'layer' have an init (a activation "
                                                          "layer has no parameters of its own)"),
    (dict(kind="layer", forward=lambda x, params, state: (x, None)), "a layer of kind 'layer' needs init(in_dim, rng, "
                                                                     "dtype, **options): init is not callable"),
    (dict(kind="layer", forward=lambda x, params, state: (x, None), init=lambda in_dim: ({}, in_dim)),
     "init must be callable as init(in_dim, rng, dtype)"),
    (dict(kind="layer", init=lambda in_dim, rng, dtype: ({}, in_dim)), "forward must be callable as forward(x, "
                                                                       "params, state)"),
])
def test_malformed_layer_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        relu_layer(**kwargs)


# ---------------------------------------------------------------------------------------------------- lookups
def test_unknown_name_lists_what_is_available_and_who_provides_it():
    with pytest.raises(UnknownNameError) as info:
        registry.get_layer("activation", "rleu")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "unknown activation 'rleu'; did you mean 'relu'?" in message
    assert "Available activations: " in message and f"relu from {BUILTIN}" in message
    assert info.value.available["relu"] == BUILTIN and info.value.kind == "activation"

    with pytest.raises(UnknownNameError, match=r"unknown update rule 'sgd_momentun'; did you mean 'sgd_momentum'.*"
                                               r"Available update rules: .*sgd_momentum from dpnet"):
        registry.get_update_rule("sgd_momentun")
    with pytest.raises(UnknownNameError, match=r"unknown loss 'hinge'\. Available losses: .*softmax from dpnet"):
        registry.get_layer("loss", "hinge")


def test_unknown_name_lists_plugins_with_their_distribution(install):
    install("good")
    with pytest.raises(UnknownNameError) as info:
        registry.get_layer("activation", "softsign")
    assert "did you mean 'fx_softsign'?" in str(info.value)
    assert "fx_softsign from dpnetfx-good 1.0 (plugin 'fxgood')" in str(info.value)
    assert f"relu from {BUILTIN}" in str(info.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'activations': expected one of activation, normalization, "
                                         "loss"):
        registry.get_layer("activations", "relu")
    with pytest.raises(ValueError, match="expected one of activation, normalization, loss, layer, update_rule"):
        registry.available("optimizer")


def test_layer_objects_and_callables_pass_through():
    layer = relu_layer("notregistered")
    assert registry.get_layer("activation", layer) is layer
    with pytest.raises(ValueError, match="layer 'notregistered' is a activation layer, not a loss"):
        registry.get_layer("loss", layer)

    def rule(w, dw, config=None):
        return w, config

    assert registry.get_update_rule(rule) is rule


def test_lookup_costs_a_dict_access():
    """A lookup after loading costs a few dict accesses: measured against a function doing three dict lookups in
    the same loop (a ratio, so that a slow or busy machine does not decide), best of five rounds each."""
    registry.get_layer("activation", "relu")  # loads
    table = {"activation": {"relu": 1}}
    rules = {"sgd": 1}

    def three_dict_accesses(kind, name):
        return table[kind][name] and rules["sgd"]

    def best(lookup, n=20000):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                lookup("activation", "relu")
            times.append(time.perf_counter() - start)
        return min(times)

    ratio = best(registry.get_layer) / best(three_dict_accesses)
    assert ratio < 4, f"a registry lookup costs {ratio:.1f} times three dict accesses"


def test_models_resolve_names_once_at_construction(monkeypatch):
    from dpnet.classifiers import fc_net

    model = fc_net.FullyConnectedNet([6], input_dim=4, num_classes=3, normalization="layernorm", dtype=np.float64,
                                     seed=0)

    def no_lookups(*args):
        raise AssertionError("looked a name up during a step")

    monkeypatch.setattr(registry, "get_layer", no_lookups)
    monkeypatch.setattr(registry, "_loaded", no_lookups)
    registry.reset()
    X, y = np.random.default_rng(0).standard_normal((5, 4)), np.array([0, 1, 2, 0, 1])
    loss, grads = model.loss(X, y)
    assert np.isfinite(loss) and set(grads) == set(model.params)


# ---------------------------------------------------------------------------------------------------- plugins
def test_plugin_found_through_its_entry_point(install):
    install("good")
    assert "dpnetfx_good" not in sys.modules
    provider = "dpnetfx-good 1.0 (plugin 'fxgood')"
    assert registry.available("activation")["fx_softsign"] == provider
    assert "dpnetfx_good" in sys.modules  # imported by the registry, through the entry point
    assert registry.available("normalization")["fx_scale"] == provider
    assert registry.available("loss")["fx_squared"] == provider
    assert registry.available("update_rule")["fx_signsgd"] == provider
    assert registry.get_layer("activation", "relu").forward is layers.relu_forward  # built-ins still there
    module = sys.modules["dpnetfx_good"]
    assert registry.get_layer("activation", "fx_softsign").forward is module.softsign_forward
    assert registry.get_update_rule("fx_signsgd") is module.signsgd
    assert registry.get_plugin_manager().get_plugin("fxgood") is module
    info = testing.check_plugin("fxgood")
    assert (info.distribution, info.version, info.module, info.status) == ("dpnetfx-good", "1.0", "dpnetfx_good",
                                                                          "loaded")


def test_plugin_layers_and_rules_train_a_model_by_name(install):
    from dpnet import solver as solver_module
    from dpnet.classifiers import fc_net

    install("good")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0).astype(int)
    model = fc_net.FullyConnectedNet([8], input_dim=4, num_classes=3, activation="fx_softsign",
                                     normalization="fx_scale", loss="fx_squared", dtype=np.float64, seed=0,
                                     weight_scale=0.5)
    solver = solver_module.Solver(model, {"X_train": X, "y_train": y, "X_val": X, "y_val": y},
                                  update_rule="fx_signsgd", optim_config={"learning_rate": 1e-2}, batch_size=20,
                                  num_epochs=5, verbose=False, seed=0)
    solver.train()
    assert solver.loss_history[-1] < solver.loss_history[0]


def _expect(install, *names, plugin, dist, problem):
    install(*names)
    with pytest.raises(PluginError) as info:
        registry.get_layer("activation", "relu")  # any use of the registry reports a broken plugin
    message = str(info.value)
    assert f"plugin {plugin!r} (distribution {dist} 1.0, entry point dpnet: {plugin} = " in message, message
    assert problem in message, message
    switch = plugin if plugin != "dpnet" else dist  # "dpnet" names the built-ins, which cannot be disabled
    assert f"To run without it, set DPNET_DISABLE_PLUGINS={switch} or uninstall {dist}." in message, message
    assert (info.value.plugin, info.value.distribution) == (plugin, dist)
    return info.value


FAILURES = {
    "broken_import": ("fxbrokenimport", "dpnetfx-broken-import",
                      "failed to import: ModuleNotFoundError: No module named 'dpnetfx_this_dependency_is_not_installed'"),
    "missing_module": ("fxmissing", "dpnetfx-missing-module",
                       "failed to import: ModuleNotFoundError: No module named 'dpnetfx_not_installed_anywhere'"),
    "hook_raises": ("fxhookraises", "dpnetfx-hook-raises",
                    "raised in its dpnet_layers hook: RuntimeError: the layer table is corrupt"),
    "not_a_list": ("fxnotalist", "dpnetfx-not-a-list",
                   "returned a malformed record from dpnet_layers: expected a list of dpnet.Layer, got dict"),
    "returns_none": ("fxreturnsnone", "dpnetfx-returns-none",
                     "returned a malformed record from dpnet_layers: expected a list of dpnet.Layer, got NoneType"),
    "not_a_layer": ("fxnotalayer", "dpnetfx-not-a-layer",
                    "returned a malformed record from dpnet_layers: expected a dpnet.Layer, got tuple"),
    "bad_kind": ("fxbadkind", "dpnetfx-bad-kind",
                 "raised in its dpnet_layers hook: ValueError: invalid Layer 'fx_kind': kind 'activatoin' is not "
                 "one of activation, normalization, loss"),
    "not_callable": ("fxnotcallable", "dpnetfx-not-callable",
                     "invalid Layer 'fx_string': forward is not callable (got str)"),
    "forged_layer": ("fxforged", "dpnetfx-forged-layer",
                     "returned a malformed record from dpnet_layers: layer 'fx_forged': forward is not callable"),
    "loss_with_backward": ("fxlossbackward", "dpnetfx-loss-with-backward",
                           "invalid Layer 'fx_loss': a loss layer returns its gradient from forward, so backward "
                           "must be None"),
    "activation_without_backward": ("fxnobackward", "dpnetfx-no-backward",
                                    "invalid Layer 'fx_nobackward': a activation layer needs a backward function"),
    "rules_not_a_dict": ("fxrulesnotadict", "dpnetfx-rules-not-a-dict",
                         "returned a malformed record from dpnet_update_rules: expected a dict {name: rule}, got "
                         "list"),
    "rule_not_callable": ("fxrulenotcallable", "dpnetfx-rule-not-callable",
                          "update rule 'fx_rule': rule is not callable (got float)"),
    "rule_bad_signature": ("fxrulesignature", "dpnetfx-rule-bad-signature",
                           "update rule 'fx_step': rule must be callable as rule(w, dw, config=None), but its "
                           "signature is (w, dw)"),
    "collides_builtin": ("fxrelu", "dpnetfx-collides-builtin",
                         "provides activation 'relu', which collides with a built-in; names must be unique"),
    "collides_builtin_rule": ("fxadam", "dpnetfx-collides-adam",
                              "provides update rule 'adam', which collides with a built-in"),
    "unknown_hook": ("fxunknownhook", "dpnetfx-unknown-hook",
                     "implements an unknown hook 'dpnet_layer' (dpnet's hooks are dpnet_layers, dpnet_update_rules "
                     "and dpnet_models)"),
    "models_not_a_dict": ("fxmodelsnotadict", "dpnetfx-models-not-a-dict",
                          "returned a malformed record from dpnet_models: expected a dict {name: factory}, got list"),
    "model_not_callable": ("fxmodelnotcallable", "dpnetfx-model-not-callable",
                           "returned a malformed record from dpnet_models: model 'fx_model': the factory is not "
                           "callable (got str)"),
    "model_bad_name": ("fxmodelbadname", "dpnetfx-model-bad-name",
                       "returned a malformed record from dpnet_models: 'my model' is not a valid model name"),
    "hook_arguments": ("fxhookarguments", "dpnetfx-hook-arguments",
                       "could not be registered: PluginValidationError"),
    "reserved_name": ("dpnet", "dpnetfx-reserved-name",
                      "uses the plugin name 'dpnet', which is reserved for dpnet's built-ins"),
}


@pytest.mark.parametrize("fixture", sorted(FAILURES))
def test_broken_plugin_gives_one_error_naming_plugin_distribution_and_problem(install, fixture, monkeypatch):
    plugin, dist, problem = FAILURES[fixture]
    error = _expect(install, fixture, plugin=plugin, dist=dist, problem=problem)
    assert error.errors == [error]
    # every entry point of the registry reports it, the CLI's listing does not raise
    with pytest.raises(PluginError, match=re.escape(problem)):
        registry.get_update_rule("sgd")
    with pytest.raises(PluginError, match=re.escape(problem)):
        registry.available("loss")
    listed = registry.list_plugins()
    assert (listed[0].name, listed[0].builtin, listed[0].status) == ("dpnet", True, "loaded")
    assert [(info.status, problem in info.reason) for info in listed if info.distribution == dist] == [
        ("error", True)]
    # ... and disabling it brings the built-ins back
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", plugin if plugin != "dpnet" else dist)
    registry.reset()
    assert registry.get_layer("activation", "relu").forward is layers.relu_forward
    assert registry.get_update_rule("adam") is optim.adam
    assert registry.get_plugin_manager().get_plugin("dpnet") is builtins
    assert [info.status for info in registry.list_plugins() if info.distribution == dist] == ["disabled"]


def test_import_failure_keeps_the_original_exception_as_cause(install):
    error = _expect(install, "broken_import", plugin="fxbrokenimport", dist="dpnetfx-broken-import",
                    problem="failed to import")
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_collision_between_two_plugins_names_both(install, monkeypatch):
    install("twin_a", "twin_b")
    with pytest.raises(PluginError) as info:
        registry.get_layer("activation", "fx_twin")
    message = str(info.value)
    assert "provides activation 'fx_twin', which collides with the one from dpnetfx-twin-" in message
    assert "dpnetfx-twin-a 1.0" in message and "dpnetfx-twin-b 1.0" in message, message
    assert "(plugin 'fxtwina')" in message or "(plugin 'fxtwinb')" in message
    # either one disabled: the other one's fx_twin is used
    for off, on in (("fxtwina", "dpnetfx-twin-b"), ("fxtwinb", "dpnetfx-twin-a")):
        monkeypatch.setenv("DPNET_DISABLE_PLUGINS", off)
        registry.reset()
        assert registry.available("activation")["fx_twin"].startswith(on)


def test_model_found_through_its_entry_point(install):
    assert "fx_mlp" not in registry.available("model")
    install("models")
    assert registry.available("model")["fx_mlp"] == "dpnetfx-models 1.0 (plugin 'fxmodels')"
    module = sys.modules["dpnetfx_models"]  # imported by the registry, through the entry point
    assert registry.get_model("fx_mlp") is module.mlp
    info = next(info for info in registry.list_plugins() if info.name == "fxmodels")
    assert (info.status, info.models, info.update_rules) == ("loaded", ["fx_mlp"], [])
    assert info.to_dict()["models"] == ["fx_mlp"]
    model = registry.get_model("fx_mlp")(width=8, input_dim=(4,), dtype=np.float64, seed=0)
    assert sorted(model.params) == ["affine1.W", "affine1.b", "affine2.W", "affine2.b", "batchnorm1.beta",
                                    "batchnorm1.gamma"]


def test_unknown_model_lists_the_models_with_did_you_mean(install):
    install("models")
    with pytest.raises(UnknownNameError) as info:
        registry.get_model("fx_mpl")
    message = str(info.value)
    assert "unknown model 'fx_mpl'; did you mean 'fx_mlp'? Available models: " in message, message
    assert "fx_mlp from dpnetfx-models 1.0 (plugin 'fxmodels')" in message, message
    assert info.value.kind == "model"


def test_model_collision_between_two_plugins_names_both(install):
    install("models", "model_twin")
    with pytest.raises(PluginError) as info:
        registry.get_model("fx_mlp")
    message = str(info.value)
    assert "provides model 'fx_mlp', which collides with the one from dpnetfx-model" in message, message
    assert "dpnetfx-models 1.0" in message and "dpnetfx-model-twin 1.0" in message, message


def test_two_distributions_with_one_plugin_name(install):
    install("same_name_a", "same_name_b")
    with pytest.raises(PluginError) as info:
        registry.get_layer("activation", "relu")
    message = str(info.value)
    assert "plugin 'fxsamename' (distribution dpnetfx-same-name-" in message
    assert "has the same plugin name as the one from dpnetfx-same-name-" in message
    assert "dpnetfx-same-name-a 1.0" in message and "dpnetfx-same-name-b 1.0" in message


def test_several_broken_plugins_give_one_error_listing_each(install):
    install("good", "hook_raises", "broken_import")
    with pytest.raises(PluginError) as info:
        registry.get_layer("activation", "fx_softsign")
    message = str(info.value)
    assert message.startswith("2 plugins failed to load:\n- plugin ")
    assert "plugin 'fxhookraises' (distribution dpnetfx-hook-raises 1.0" in message
    assert "plugin 'fxbrokenimport' (distribution dpnetfx-broken-import 1.0" in message
    assert len(info.value.errors) == 2


# ---------------------------------------------------------------------------------------------------- control
def test_disabled_plugins_are_blocked_before_they_are_imported(install, monkeypatch):
    install("broken_import", "hook_raises", "good")
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", " fxbrokenimport , dpnetfx-hook-raises")  # plugin or dist name
    registry.reset()
    assert registry.available("activation")["fx_softsign"].startswith("dpnetfx-good")
    assert "dpnetfx_broken_import" not in sys.modules and "dpnetfx_hook_raises" not in sys.modules
    pm = registry.get_plugin_manager()
    assert pm.is_blocked("fxbrokenimport") and pm.is_blocked("fxhookraises")
    statuses = {info.name: (info.status, info.reason) for info in registry.list_plugins()}
    assert statuses["fxbrokenimport"] == ("disabled", "DPNET_DISABLE_PLUGINS lists it")
    assert statuses["fxgood"] == ("loaded", "")


def test_autoload_off_loads_only_the_builtins(install, monkeypatch):
    install("good", "broken_import")
    monkeypatch.setenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset()
    assert set(registry.available("activation").values()) == {BUILTIN}
    assert set(registry.available("update_rule").values()) == {BUILTIN}
    assert "dpnetfx_good" not in sys.modules
    with pytest.raises(UnknownNameError, match=r"Plugins are not loaded: DPNET_DISABLE_PLUGIN_AUTOLOAD is set"):
        registry.get_layer("activation", "fx_softsign")
    statuses = {info.name: info.status for info in registry.list_plugins()}
    assert statuses["dpnet"] == "loaded" and statuses["fxgood"] == statuses["fxbrokenimport"] == "disabled"

    monkeypatch.setenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", "0")  # "0" means off
    registry.reset()
    with pytest.raises(PluginError, match="fxbrokenimport"):
        registry.available("activation")


def test_disabled_plugin_is_mentioned_when_its_name_is_unknown(install, monkeypatch):
    install("good")
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "fxgood")
    registry.reset()
    with pytest.raises(UnknownNameError, match=r"\(Disabled by DPNET_DISABLE_PLUGINS: dpnetfx-good 1.0 "
                                               r"\(plugin 'fxgood'\)"):
        registry.get_layer("activation", "fx_softsign")


def test_builtins_cannot_be_disabled(monkeypatch):
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "dpnet")
    registry.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.get_layer("activation", "relu").forward is layers.relu_forward
    assert any("dpnet's built-ins cannot be disabled" in str(w.message) for w in caught)


def test_reset_picks_up_newly_installed_plugins(install):
    assert "fx_softsign" not in registry.available("activation")
    install("good")  # resets
    assert "fx_softsign" in registry.available("activation")
