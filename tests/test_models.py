"""dpnet.models.Sequential: networks from any registered layers (in one process)."""

import numpy as np
import pytest

from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.models import Sequential
from dpnet.registry import Layer
from dpnet.solver import Solver


def _fc_spelling(hidden, normalization=None, keep=None, scale=2e-2, classes=10):
    layers = []
    for units in hidden:
        layers += [{"layer": "affine", "units": units, "weight_scale": scale}]
        layers += [normalization] if normalization else []
        layers += ["relu"] + ([{"layer": "dropout", "keep": keep}] if keep else [])
    return layers + [{"layer": "affine", "units": classes, "weight_scale": scale}]


def _fc_name(name):
    """FullyConnectedNet's name of a Sequential parameter of the same network ("affine2.W" -> "W2")."""
    layer, param = name.split(".")
    return {"W": "W", "b": "b", "gamma": "gamma", "beta": "beta"}[param] + layer.lstrip("abcdefghijklmnopqrstuvwxyz")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("normalization, keep", [(None, None), ("batchnorm", None), ("layernorm", 0.7)])
def test_a_sequential_spelling_of_fully_connected_net_computes_the_same_bits(dtype, normalization, keep):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 3, 4, 4)), rng.integers(10, size=16)
    fc = FullyConnectedNet([20, 15], input_dim=48, normalization=normalization, dropout=keep or 1, weight_scale=2e-2,
                           seed=3, dtype=dtype, reg=0.1, label_smoothing=0.1)
    seq = Sequential(_fc_spelling([20, 15], normalization, keep), input_dim=(3, 4, 4), seed=3, dtype=dtype, reg=0.1,
                     label_smoothing=0.1)
    assert sorted(map(_fc_name, seq.params)) == sorted(fc.params)
    for name, value in seq.params.items():
        np.testing.assert_array_equal(value, fc.params[_fc_name(name)], err_msg=name)
    if keep:  # the same masks: one generator, drawn layer by layer, as the Solver hands them out
        fc.dropout_param["rng"] = np.random.default_rng(5)
        shared = np.random.default_rng(5)
        for state in seq.bn_params:
            state["rng"] = shared
    loss, grads = seq.loss(X, y)
    fc_loss, fc_grads = fc.loss(X, y)
    assert loss == fc_loss
    for name, value in grads.items():
        np.testing.assert_array_equal(value, fc_grads[_fc_name(name)], err_msg=name)
    np.testing.assert_array_equal(seq.loss(X), fc.loss(X))


def test_parameters_are_named_by_layer_and_written_into_given_arrays():
    model = Sequential([{"layer": "affine", "units": 5}, "batchnorm", "relu", {"layer": "affine", "units": 3},
                        "relu", {"layer": "affine", "units": 4}], input_dim=(6,), dtype=np.float64, seed=0)
    assert list(model.params) == ["affine1.W", "affine1.b", "batchnorm1.gamma", "batchnorm1.beta", "affine2.W",
                                  "affine2.b", "affine3.W", "affine3.b"]
    assert model.num_classes == 4 and len(model.bn_params) == 6
    X, y = np.random.default_rng(1).standard_normal((7, 6)), np.arange(7) % 4
    out = {name: np.empty_like(value) for name, value in model.params.items()}
    _, grads = model.loss(X, y, grads=out)
    assert all(grads[name] is out[name] for name in out)
    np.testing.assert_array_equal(out["affine1.W"], model.loss(X, y)[1]["affine1.W"])


def test_normalization_options_reach_the_normalization():
    X = np.random.default_rng(1).standard_normal((8, 6))
    model = Sequential([{"layer": "batchnorm", "momentum": 0.5, "eps": 1e-3}, {"layer": "affine", "units": 2}],
                       input_dim=(6,), dtype=np.float64, seed=0)
    model.loss(X, np.zeros(8, dtype=int))
    state = model.bn_params[0]
    np.testing.assert_allclose(state["running_mean"], 0.5 * X.mean(axis=0), rtol=1e-12)  # momentum 0.5, not 0.9
    np.testing.assert_allclose(state["running_var"], 0.5 + 0.5 * X.var(axis=0), rtol=1e-12)
    assert state["eps"] == 1e-3


def test_reg_is_l2_on_parameters_of_two_or_more_dimensions():
    X, y = np.random.default_rng(1).standard_normal((7, 6)), np.arange(7) % 4
    spec = [{"layer": "affine", "units": 5}, "layernorm", "relu", {"layer": "affine", "units": 4}]
    plain, regularized = (Sequential(spec, input_dim=(6,), dtype=np.float64, seed=0, reg=reg) for reg in (0, 0.3))
    (loss0, g0), (loss1, g1) = plain.loss(X, y), regularized.loss(X, y)
    weights = [w for w in plain.params.values() if w.ndim == 2]
    assert loss1 == pytest.approx(loss0 + 0.15 * sum(np.sum(w * w) for w in weights), rel=1e-12)
    np.testing.assert_allclose(g1["affine1.W"], g0["affine1.W"] + 0.3 * plain.params["affine1.W"], rtol=1e-12)
    np.testing.assert_array_equal(g1["layernorm1.gamma"], g0["layernorm1.gamma"])  # 1-D: not regularized


def test_unknown_names_and_options_are_named():
    with pytest.raises(ValueError, match=r"unknown layer 'rleu'; did you mean 'relu'.*Available layers: .*affine"):
        Sequential([{"layer": "affine", "units": 3}, "rleu"], input_dim=(4,))
    with pytest.raises(ValueError, match=r"layer 0 \(affine\): unknown or missing option\(s\) 'unit'; it takes units, "
                                         r"weight_scale"):
        Sequential([{"layer": "affine", "unit": 3}], input_dim=(4,))
    with pytest.raises(ValueError, match=r"layer 0 \(affine\): unknown or missing option\(s\)"):
        Sequential(["affine"], input_dim=(4,))
    with pytest.raises(ValueError, match=r"layer 1 \(relu\): unknown or missing option\(s\) 'slope'"):
        Sequential([{"layer": "affine", "units": 3}, {"layer": "relu", "slope": 2}], input_dim=(4,))
    with pytest.raises(ValueError, match=r"layer 0 \(batchnorm\): a normalization needs inputs of shape \(features,\)"):
        Sequential(["batchnorm", {"layer": "affine", "units": 3}], input_dim=(3, 2, 2))
    with pytest.raises(ValueError, match=r"layer 0 \(affine\): units must be a positive integer, got 0"):
        Sequential([{"layer": "affine", "units": 0}], input_dim=(4,))
    with pytest.raises(ValueError, match=r"the last layer's output must be the scores \(classes,\), got shape "
                                         r"\(3, 2, 2\)"):
        Sequential(["relu"], input_dim=(3, 2, 2))
    with pytest.raises(ValueError, match=r"layers\[1\] must be a layer name or a dict with a 'layer' name"):
        Sequential([{"layer": "affine", "units": 3}, {"units": 3}], input_dim=(4,))
    with pytest.raises(ValueError, match="layers is empty"):
        Sequential([], input_dim=(4,))


def _broken(name, forward_out=None, grads=None, dx=None):
    """A plugin-style layer of kind "layer" with one weight, broken in the way the arguments say."""
    def init(in_dim, rng, dtype):
        return {"w": np.ones(in_dim, dtype=dtype)}, tuple(in_dim)

    def forward(x, params, state):
        out = x * params["w"] if forward_out is None else forward_out(x)
        return out, x

    def backward(dout, cache):
        g = {"w": (dout * cache).sum(axis=0)} if grads is None else grads(dout, cache)
        return (dout if dx is None else dx(dout)), g

    return Layer(name, "layer", forward, backward, init=init)


@pytest.mark.parametrize("broken, message", [
    (dict(forward_out=lambda x: x[:, :2]), r"layer 1 \(fx\): forward returned a float64 array of shape \(5, 2\), "
                                           r"expected a float64 array of shape \(5, 3\)"),
    (dict(forward_out=lambda x: x.astype(np.float32)), r"layer 1 \(fx\): forward returned a float32 array"),
    (dict(grads=lambda d, c: {}), r"layer 1 \(fx\): backward returned gradients for \[\], expected exactly its "
                                  r"parameters \['w'\]"),
    (dict(grads=lambda d, c: {"w": np.zeros(2)}), r"layer 1 \(fx\): gradient 'w' is a float64 array of shape \(2,\), "
                                                  r"expected a float64 array of shape \(3,\)"),
    (dict(dx=lambda d: d[:, :1]), r"layer 1 \(fx\): backward returned dx a float64 array of shape \(5, 1\)"),
])
def test_a_malformed_plugin_layer_is_named_at_its_first_training_call(monkeypatch, broken, message):
    from dpnet import models

    layer = _broken("fx", **broken)
    real = models.resolve
    monkeypatch.setattr(models, "resolve", lambda name: layer if name == "fx" else real(name))
    model = Sequential([{"layer": "affine", "units": 3}, "fx", {"layer": "affine", "units": 2}], input_dim=(4,),
                       dtype=np.float64, seed=0)
    X, y = np.random.default_rng(0).standard_normal((5, 4)), np.array([0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match=message):
        model.loss(X, y)


def test_trains_with_the_solver_and_checkpoints_its_state(tmp_path):
    from dpnet.checkpoint import restore_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 12)) * 3
    y = rng.integers(3, size=330)
    X = (centres[y] + rng.standard_normal((330, 12))).reshape(330, 3, 2, 2)
    data = dict(X_train=X[:300], y_train=y[:300], X_val=X[300:], y_val=y[300:])
    spec = [{"layer": "affine", "units": 16}, "batchnorm", "relu", {"layer": "dropout", "keep": 0.9},
            {"layer": "affine", "units": 3}]

    def solver(epochs):
        model = Sequential(spec, input_dim=(3, 2, 2), dtype=np.float64, seed=0)
        return Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=30,
                      num_epochs=epochs, seed=1, verbose=False)

    whole = solver(4).train()
    assert whole.best_val_acc > 0.9
    half = solver(2).train()
    save_checkpoint(tmp_path / "half.npz", half)
    resumed = solver(4)
    restore_checkpoint(resumed, tmp_path / "half.npz")
    np.testing.assert_array_equal(resumed.model.bn_params[1]["running_mean"], half.model.bn_params[1]["running_mean"])
    resumed.train()
    for name, value in whole.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], value, err_msg=name)
    np.testing.assert_array_equal(resumed.model.bn_params[1]["running_var"], whole.model.bn_params[1]["running_var"])
