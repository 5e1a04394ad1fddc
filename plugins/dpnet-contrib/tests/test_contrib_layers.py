"""dpnet-contrib's layers of kind "layer" (prelu, maxout, residual, lowrank): gradients exact alone and inside a whole
Sequential, dtypes kept, values as documented, errors that say what is wrong, and each trains with the Solver."""


import numpy as np
import pytest

from dpnet import registry, testing
from dpnet.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array
from dpnet.models import Sequential
from dpnet.solver import Solver
from dpnet_contrib import layers

# Each layer with options to check it with, and an input shape it accepts.
CASES = {
    "prelu": ((2, 3), {}),
    "maxout": ((2, 3), {"units": 4, "pieces": 3}),
    "residual": ((6,), {"expansion": 2}),
    "lowrank": ((2, 3), {"units": 5, "rank": 2}),
}
TOL = 1e-7


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.delenv("DPNET_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    yield
    registry.reset()


def _layer(name):
    return registry.get_layer("layer", name)


def _generic(params, rng):
    """The parameters moved off their initialization (zero biases, equal slopes), so every gradient is exercised."""
    return {key: value + 0.3 * rng.standard_normal(value.shape).astype(value.dtype) for key, value in params.items()}


def _setup(name, dtype=np.float64, n=4, seed=0):
    in_dim, options = CASES[name]
    rng = np.random.default_rng(seed)
    params, out_dim = _layer(name).init(in_dim, rng, np.dtype(dtype), **options)
    params = _generic(params, rng)
    x = rng.standard_normal((n, *in_dim)).astype(dtype)
    return params, out_dim, x, {"mode": "train", "options": dict(options)}, rng


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", CASES)
def test_check_layer(name):
    in_dim, options = CASES[name]
    layer = _layer(name)
    testing.check_layer(layer)  # with the in_dim and options its init declares (what check_plugin uses)
    testing.check_layer(layer, in_dim=in_dim, options=options)
    testing.check_layer(layer, in_dim=in_dim, options=options, seed=1)


@pytest.mark.parametrize("in_dim, options", [
    ((3, 4), {"units": 3, "pieces": 1}),  # one piece: an affine layer
    ((5,), {"units": 6}),  # pieces: 2 by default
])
def test_check_layer_maxout_variants(in_dim, options):
    testing.check_layer(_layer("maxout"), in_dim=in_dim, options=options)


@pytest.mark.parametrize("options", [{"activation": "relu"}, {"activation": "tanh", "branch_scale": 1.0},
                                     {"expansion": 1, "eps": 1e-3}])
def test_check_layer_residual_variants(options):
    testing.check_layer(_layer("residual"), in_dim=(5,), options=options)


def test_check_layer_lowrank_of_full_rank():
    testing.check_layer(_layer("lowrank"), in_dim=(4,), options={"units": 3, "rank": 6})


@pytest.mark.parametrize("name", CASES)
def test_layer_gradients_are_exact(name):
    """dx and every parameter's gradient against centred differences, in float64."""
    layer = _layer(name)
    params, out_dim, x, state, rng = _setup(name)
    out, cache = layer.forward(x, params, state)
    assert out.shape == (x.shape[0], *out_dim)
    dout = rng.standard_normal(out.shape)
    dx, grads = layer.backward(dout, cache)
    assert set(grads) == set(params)
    numerical = eval_numerical_gradient_array(lambda v: layer.forward(v, params, state)[0], x.copy(), dout)
    assert testing.gradient_error(dx, numerical) <= TOL, "dx"
    for key, value in params.items():
        assert grads[key].shape == value.shape, key
        numerical = eval_numerical_gradient_array(lambda v, key=key: layer.forward(x, {**params, key: v}, state)[0],
                                                  value.copy(), dout)
        assert testing.gradient_error(grads[key], numerical) <= TOL, key


@pytest.mark.parametrize("name", CASES)
def test_float32_stays_float32_and_inputs_are_not_modified(name):
    layer = _layer(name)
    params, out_dim, x, state, rng = _setup(name, dtype=np.float32)
    originals = {key: value.copy() for key, value in params.items()}
    x0 = x.copy()
    assert all(value.dtype == np.float32 for value in params.values())
    out, cache = layer.forward(x, params, state)
    assert out.dtype == np.float32 and out.shape == (x.shape[0], *out_dim)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout0 = dout.copy()
    dx, grads = layer.backward(dout, cache)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    for key, value in params.items():
        assert grads[key].dtype == np.float32 and grads[key].shape == value.shape, key
        np.testing.assert_array_equal(value, originals[key])
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, dout0)
    state["mode"] = "test"
    np.testing.assert_array_equal(layer.forward(x, params, state)[0], layer.forward(x, params, state)[0])


@pytest.mark.parametrize("name", ["maxout", "lowrank"])
def test_the_fast_backward_writes_into_the_given_arrays(name):
    """need_dx=False and grads_out (what Sequential passes a first layer) give the same gradients, in place."""
    layer = _layer(name)
    params, _, x, state, rng = _setup(name)
    out, cache = layer.forward(x, params, state)
    dout = rng.standard_normal(out.shape)
    dx, grads = layer.backward(dout, cache)
    buffers = {key: np.full_like(value, np.nan) for key, value in params.items()}
    none, fast = layer.backward(dout, cache, need_dx=False, grads_out=buffers)
    assert none is None
    for key in params:
        assert fast[key] is buffers[key]
        np.testing.assert_allclose(fast[key], grads[key], rtol=1e-14, atol=0)


# Small whole networks using each layer (twice where it matters), on inputs of shape (2, 2, 3).
SPECS = {
    "prelu": ["prelu", {"layer": "affine", "units": 5}, "prelu", {"layer": "affine", "units": 3}],
    "maxout": [{"layer": "maxout", "units": 5, "pieces": 3}, {"layer": "maxout", "units": 3}],
    "residual": [{"layer": "affine", "units": 6}, {"layer": "residual", "expansion": 2},
                 {"layer": "residual", "activation": "relu", "branch_scale": 1.0}, {"layer": "affine", "units": 3}],
    "lowrank": [{"layer": "lowrank", "units": 6, "rank": 2}, "tanh", {"layer": "lowrank", "units": 3, "rank": 3}],
}


@pytest.mark.parametrize("name", SPECS)
def test_gradients_inside_a_whole_sequential(name):
    """Every parameter of a float64 Sequential using the layer (with L2 reg), against centred differences of the
    loss."""
    model = Sequential(SPECS[name], input_dim=(2, 2, 3), dtype=np.float64, seed=0, reg=0.05)
    rng = np.random.default_rng(1)
    model.params.update(_generic(model.params, rng))
    X, y = rng.standard_normal((5, 2, 2, 3)), rng.integers(3, size=5)
    loss, grads = model.loss(X, y)
    assert set(grads) == set(model.params) and any(key.startswith(f"{name}1.") for key in grads)
    for key, value in model.params.items():
        numerical = eval_numerical_gradient(lambda _: model.loss(X, y)[0], value, verbose=False)
        assert testing.gradient_error(grads[key], numerical) <= TOL, key
    testing.check_model(model, X, y)


# ----------------------------------------------------------------------------------------------- values
def test_prelu_values_and_init():
    params, out_dim = layers.prelu_init((2, 3), np.random.default_rng(0), np.dtype(np.float32))
    assert out_dim == (2, 3)
    assert params["alpha"].shape == (6,) and params["alpha"].dtype == np.float32 and np.all(params["alpha"] == 0.25)
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    out, _ = layers.prelu_forward(x, {"alpha": np.array([0.25, 0.5, 0.1, 0.1, 0.1])}, {"mode": "test"})
    np.testing.assert_allclose(out, [[-0.5, -0.25, 0.0, 0.5, 2.0]])
    params, _ = layers.prelu_init((4,), np.random.default_rng(0), np.dtype(np.float64), alpha=0.1)
    np.testing.assert_array_equal(params["alpha"], 0.1)


def test_prelu_slopes_are_not_decayed_by_reg():
    """alpha is flat (one dimension) even for image-shaped inputs, so the L2 reg on weights leaves it alone."""
    model = Sequential(["prelu", {"layer": "affine", "units": 3}], input_dim=(2, 2, 3), dtype=np.float64, seed=0)
    assert model.params["prelu1.alpha"].shape == (12,)
    X, y = np.random.default_rng(0).standard_normal((4, 2, 2, 3)), np.array([0, 1, 2, 0])
    model.reg = 0.0
    loss0, grads0 = model.loss(X, y)
    model.reg = 10.0
    loss1, grads1 = model.loss(X, y)
    np.testing.assert_array_equal(grads1["prelu1.alpha"], grads0["prelu1.alpha"])
    w = model.params["affine1.W"]
    assert loss1 == pytest.approx(loss0 + 5.0 * np.sum(w * w), rel=1e-12)


def test_maxout_is_the_max_over_pieces_of_an_affine_map():
    rng = np.random.default_rng(0)
    params, out_dim = layers.maxout_init((2, 3), rng, np.dtype(np.float64), units=4, pieces=3)
    assert out_dim == (4,) and params["W"].shape == (6, 12) and params["b"].shape == (12,)
    assert np.all(params["b"] == 0)
    params = _generic(params, rng)
    x = rng.standard_normal((5, 2, 3))
    out, _ = layers.maxout_forward(x, params, {"mode": "test", "options": {"units": 4, "pieces": 3}})
    z = x.reshape(5, 6) @ params["W"] + params["b"]
    expected = np.stack([z[:, 3 * u: 3 * u + 3].max(axis=1) for u in range(4)], axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-14)
    # pieces defaults to 2, when the spec does not give it
    params, _ = layers.maxout_init((6,), rng, np.dtype(np.float64), units=3)
    assert params["W"].shape == (6, 6)
    out, _ = layers.maxout_forward(np.eye(6), params, {"mode": "test", "options": {"units": 3}})
    np.testing.assert_array_equal(out, np.maximum(params["W"][:, 0::2], params["W"][:, 1::2]))


def test_residual_block_values_and_near_identity_init():
    rng = np.random.default_rng(0)
    D = 16
    params, out_dim = layers.residual_init((D,), rng, np.dtype(np.float64))
    assert out_dim == (D,)
    shapes = {key: value.shape for key, value in params.items()}
    assert shapes == {"gamma": (D,), "beta": (D,), "W1": (D, 4 * D), "b1": (4 * D,), "W2": (4 * D, D), "b2": (D,)}
    x = 2 + 3 * rng.standard_normal((64, D))
    state = {"mode": "train", "options": {}}
    out, _ = layers.residual_forward(x, params, state)
    # the branch starts at about branch_scale (0.1) of the normalized input's unit scale
    branch = np.sqrt(np.mean((out - x) ** 2))
    assert 0.03 < branch < 0.3
    # x + W2 gelu(W1 LN(x) + b1) + b2, computed by hand (and with relu when asked)
    params = _generic(params, rng)
    gelu = registry.get_layer("activation", "gelu").forward
    normed = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)
    normed = normed * params["gamma"] + params["beta"]
    for activation, act in (("gelu", lambda h: gelu(h)[0]), ("relu", lambda h: np.maximum(h, 0))):
        expected = x + act(normed @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
        out, _ = layers.residual_forward(x, params, {"mode": "test", "options": {"activation": activation}})
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # a zero branch is the identity, exactly; expansion sets the hidden width
    zero = dict(params, W2=np.zeros((4 * D, D)), b2=np.zeros(D))
    np.testing.assert_array_equal(layers.residual_forward(x, zero, state)[0], x)
    params, _ = layers.residual_init((D,), rng, np.dtype(np.float64), expansion=2, branch_scale=0.0)
    assert params["W1"].shape == (D, 2 * D) and np.all(params["W2"] == 0)


def test_lowrank_is_an_affine_layer_with_a_factored_weight():
    rng = np.random.default_rng(0)
    params, out_dim = layers.lowrank_init((2, 3), rng, np.dtype(np.float64), units=5, rank=2)
    assert out_dim == (5,)
    assert {key: value.shape for key, value in params.items()} == {"U": (6, 2), "V": (2, 5), "b": (5,)}
    params = _generic(params, rng)
    x = rng.standard_normal((7, 2, 3))
    out, _ = layers.lowrank_forward(x, params, {"mode": "test", "options": {}})
    affine = registry.get_layer("layer", "affine")
    expected, _ = affine.forward(x, {"W": params["U"] @ params["V"], "b": params["b"]}, {"mode": "test"})
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert np.linalg.matrix_rank(params["U"] @ params["V"]) == 2
    # W = U @ V starts with He's variance 2 / D
    params, _ = layers.lowrank_init((400,), rng, np.dtype(np.float64), units=300, rank=50)
    assert np.var(params["U"] @ params["V"]) == pytest.approx(2 / 400, rel=0.1)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec, message", [
    ({"layer": "maxout"}, r"layer 0 \(maxout\): unknown or missing option\(s\) .*it takes units, pieces, weight_scale"),
    ({"layer": "maxout", "units": 4, "piece": 2}, r"layer 0 \(maxout\): unknown or missing option\(s\) 'piece'"),
    ({"layer": "maxout", "units": 0}, r"layer 0 \(maxout\): units must be a positive integer, got 0"),
    ({"layer": "maxout", "units": 4, "pieces": 1.5}, r"pieces must be a positive integer, got 1.5"),
    ({"layer": "lowrank", "units": 4}, r"layer 0 \(lowrank\): unknown or missing option\(s\) .*it takes units, rank"),
    ({"layer": "lowrank", "units": 4, "rank": "2"}, r"layer 0 \(lowrank\): rank must be a positive integer, got '2'"),
    ({"layer": "residual"}, r"layer 0 \(residual\): the residual block needs inputs of shape \(features,\), got "
                            r"\(2, 2, 3\): put an affine layer before it"),
    ({"layer": "prelu", "slope": 0.1}, r"layer 0 \(prelu\): unknown or missing option\(s\) 'slope'; it takes alpha"),
])
def test_bad_options_are_errors_that_say_which(spec, message):
    with pytest.raises(ValueError, match=message):
        Sequential([spec, {"layer": "affine", "units": 3}], input_dim=(2, 2, 3))


@pytest.mark.parametrize("options, message", [
    ({"activation": "gleu"}, r"unknown activation 'gleu'; did you mean 'gelu'"),
    ({"expansion": 0}, r"expansion must be a positive integer, got 0"),
    ({"branch_scale": -1}, r"branch_scale must be >= 0, got -1"),
    ({"eps": 0}, r"eps must be > 0, got 0"),
])
def test_bad_residual_options(options, message):
    spec = [{"layer": "affine", "units": 4}, {"layer": "residual", **options}, {"layer": "affine", "units": 3}]
    with pytest.raises(ValueError, match=r"layer 1 \(residual\): " + message):
        Sequential(spec, input_dim=(2, 2, 3))


# ----------------------------------------------------------------------------------------------- training
def _blobs(n, seed, num_classes=4, dim=12):
    """Each class a Gaussian blob around its own centre."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((num_classes, dim)) * 1.5
    y = rng.integers(num_classes, size=n)
    return centres[y] + rng.standard_normal((n, dim)), y


TRAIN_SPECS = {
    "prelu": [{"layer": "affine", "units": 32}, "prelu", {"layer": "affine", "units": 4}],
    "maxout": [{"layer": "maxout", "units": 16, "pieces": 3}, {"layer": "affine", "units": 4}],
    "residual": [{"layer": "affine", "units": 16}, "residual", {"layer": "residual", "activation": "relu"},
                 {"layer": "affine", "units": 4}],
    "lowrank": [{"layer": "lowrank", "units": 32, "rank": 4}, "relu", {"layer": "lowrank", "units": 4, "rank": 4}],
}


@pytest.mark.parametrize("name", TRAIN_SPECS)
def test_trains_in_a_sequential_with_the_solver(name):
    """A small float32 network using the layer learns four Gaussian blobs far better than chance (25%)."""
    X_train, y_train = _blobs(400, 0)
    X_val, y_val = _blobs(200, 1)
    data = dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val)
    model = Sequential(TRAIN_SPECS[name], input_dim=12, seed=0, reg=1e-4)
    before = {key: value.copy() for key, value in model.params.items()}
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=50,
                    num_epochs=6, seed=0, verbose=False)
    solver.train()
    assert all(value.dtype == np.float32 for value in model.params.values())
    assert solver.best_val_acc >= 0.9, solver.val_acc_history
    assert np.mean(solver.loss_history[-8:]) < 0.5 * solver.loss_history[0]
    for key, value in model.params.items():  # the layer's own parameters were trained too
        if key.startswith(f"{name}1."):
            assert not np.array_equal(value, before[key]), key
    assert np.mean(np.argmax(model.loss(X_val), axis=1) == y_val) == solver.best_val_acc
