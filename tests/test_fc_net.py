"""FullyConnectedNet: gradient checks in float64 for every normalization, with and without dropout and
regularization; dtype discipline; clear errors on bad input."""

import numpy as np
import pytest

from dpnet.classifiers.fc_net import FullyConnectedNet, TwoLayerNet
from dpnet.gradient_check import eval_numerical_gradient, rel_error

H = 1e-5  # the seed's step


def _kink_free_case(normalization, reg, dropout, max_tries=200):
    """A small model and batch whose activation inputs all lie at least 20 steps from ReLU's kink at 0.

    A centred difference across the kink measures a one-sided slope, not the gradient, so such cases are
    skipped deterministically (the first seed that qualifies is used).
    """
    for seed in range(max_tries):
        rng = np.random.default_rng(seed)
        X, y = rng.standard_normal((5, 15)), rng.integers(10, size=5)
        model = FullyConnectedNet([20, 30], input_dim=15, num_classes=10, reg=reg, weight_scale=5e-2,
                                  dtype=np.float64, normalization=normalization, dropout=dropout, seed=seed)
        activation, closest = model._activation, []

        class Recording:
            backward = activation.backward

            @staticmethod
            def forward(x):
                closest.append(np.abs(x).min())
                return activation.forward(x)

        model._activation = Recording
        model.loss(X, y)
        model._activation = activation
        if min(closest) > 20 * H:
            return model, X, y
    raise AssertionError("no kink-free case found")


@pytest.mark.parametrize("dropout", [1, 0.5])
@pytest.mark.parametrize("reg", [0, 3.14])
@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_gradients(normalization, reg, dropout):
    model, X, y = _kink_free_case(normalization, reg, dropout)
    loss, grads = model.loss(X, y)
    assert sorted(grads) == sorted(model.params)
    for name in sorted(grads):
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name], verbose=False, h=H)
        analytic = grads[name]
        if normalization == "batchnorm" and name in ("b1", "b2"):
            # A bias followed by batchnorm is cancelled by the mean subtraction: its true gradient is zero.
            assert np.abs(analytic).max() < 1e-12 and np.abs(numeric).max() < 1e-9, name
            continue
        # The seed's metric (largest elementwise error) is dominated by rounding on tiny entries: the seed prints
        # up to 2.34e-6. The norm-wise error measures the gradient as a whole.
        assert rel_error(numeric, analytic) < 1e-5, name
        normwise = np.linalg.norm(numeric - analytic) / (np.linalg.norm(numeric) + np.linalg.norm(analytic))
        assert normwise < 1e-7, name


def test_architecture_and_initialization():
    model = FullyConnectedNet([7, 6], input_dim=12, num_classes=4, normalization="batchnorm", weight_scale=0.1,
                              seed=0)
    assert {k: v.shape for k, v in model.params.items()} == {
        "W1": (12, 7), "b1": (7,), "gamma1": (7,), "beta1": (7,), "W2": (7, 6), "b2": (6,), "gamma2": (6,),
        "beta2": (6,), "W3": (6, 4), "b3": (4,)}
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert np.all(model.params["gamma1"] == 1) and np.all(model.params["beta2"] == 0)
    assert np.all(model.params["b3"] == 0)
    big = FullyConnectedNet([500], input_dim=400, weight_scale=0.1, seed=1)
    assert abs(big.params["W1"].std() - 0.1) < 0.005
    same = FullyConnectedNet([500], input_dim=400, weight_scale=0.1, seed=1)
    np.testing.assert_array_equal(big.params["W1"], same.params["W1"])


def test_regularization_covers_weights_only():
    model = FullyConnectedNet([4], input_dim=3, num_classes=2, normalization="layernorm", reg=0.0,
                              dtype=np.float64, seed=0)
    X, y = np.ones((2, 3)), np.array([0, 1])
    base, _ = model.loss(X, y)
    model.reg = 2.0
    with_reg, grads = model.loss(X, y)
    penalty = 0.5 * 2.0 * sum(np.sum(model.params[w] ** 2) for w in ("W1", "W2"))
    assert abs(with_reg - base - penalty) < 1e-12


def test_float32_end_to_end():
    model = FullyConnectedNet([8], input_dim=6, num_classes=3, normalization="batchnorm", dropout=0.7, seed=0)
    X = np.random.default_rng(0).standard_normal((4, 6))  # float64 input is cast, not upcast into
    assert model.loss(X).dtype == np.float32
    loss, grads = model.loss(X, np.array([0, 1, 2, 0]))
    assert all(g.dtype == np.float32 for g in grads.values())


def test_test_mode_uses_running_statistics_and_no_dropout():
    model = FullyConnectedNet([8], input_dim=6, num_classes=3, normalization="batchnorm", dropout=0.5,
                              dtype=np.float64, seed=0)
    X = np.random.default_rng(0).standard_normal((4, 6))
    np.testing.assert_array_equal(model.loss(X), model.loss(X))  # deterministic at test time
    np.testing.assert_allclose(model.loss(X[:1]), model.loss(X)[:1], rtol=1e-12)  # no batch statistics
    without = FullyConnectedNet([8], input_dim=6, num_classes=3, normalization="batchnorm", dtype=np.float64, seed=0)
    for rng in (None, np.random.default_rng(1)):  # a seeded mask or the Solver's generator: never used at test time
        model.dropout_param["rng"] = rng
        np.testing.assert_array_equal(model.loss(X), without.loss(X))  # the same network with no dropout at all


def test_two_layer_net_is_float64():
    assert all(v.dtype == np.float64 for v in TwoLayerNet(input_dim=4, hidden_dim=3).params.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_dims=[0]), "hidden_dims"),
    (dict(hidden_dims=[10], dropout=0), "dropout"),
    (dict(hidden_dims=[10], dropout=1.5), "dropout"),
    (dict(hidden_dims=[10], reg=-1), "reg"),
    (dict(hidden_dims=[10], dtype=np.int32), "dtype"),
    (dict(hidden_dims=[10], input_dim=0), "input_dim"),
    (dict(hidden_dims=[10], num_classes=2.5), "num_classes"),
])
def test_bad_construction_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FullyConnectedNet(**kwargs)


@pytest.mark.parametrize("kind, kwargs", [("activation", dict(activation="nope")),
                                          ("normalization", dict(normalization="nope")),
                                          ("loss", dict(loss="nope"))])
def test_unknown_layer_names_are_errors(kind, kwargs):
    with pytest.raises(ValueError, match="nope"):
        FullyConnectedNet([4], **kwargs)


def test_bad_batches_are_errors():
    model = FullyConnectedNet([4], input_dim=6, num_classes=3, seed=0)
    with pytest.raises(ValueError, match="input_dim == 6"):
        model.loss(np.ones((2, 5)))
    with pytest.raises(ValueError, match="non-empty"):
        model.loss(np.ones((0, 6)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.loss(np.ones((2, 6)), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        model.loss(np.ones((2, 6)), np.array([0, 1, 2]))
    bad = np.ones((2, 6))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        model.loss(bad, np.array([0, 1]))
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        model.loss(bad)


def test_label_smoothing_reaches_the_loss():
    X, y = np.random.default_rng(0).standard_normal((4, 6)), np.array([0, 1, 2, 0])
    plain = FullyConnectedNet([5], input_dim=6, num_classes=3, dtype=np.float64, seed=0)
    smooth = FullyConnectedNet([5], input_dim=6, num_classes=3, dtype=np.float64, seed=0, label_smoothing=0.2)
    assert smooth.loss(X, y)[0] != plain.loss(X, y)[0]
    with pytest.raises(ValueError, match="'svm' does not"):
        FullyConnectedNet([5], loss="svm", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        FullyConnectedNet([5], label_smoothing=1.0)


def _net_and_batch(normalization, dtype):
    """A 3-layer net with L2, dropout and the normalization, and a batch of 8."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 15)), rng.integers(10, size=8)
    model = FullyConnectedNet([20, 30], input_dim=15, num_classes=10, reg=0.3, weight_scale=5e-2, dtype=dtype,
                              normalization=normalization, dropout=0.7, seed=1)
    return model, X, y


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_gradients_written_into_given_arrays_are_the_same(normalization):
    model, X, y = _net_and_batch(normalization, np.float32)
    loss, expected = model.loss(X, y)
    given = {name: np.full_like(w, np.nan) for name, w in model.params.items()}
    loss_again, grads = model.loss(X, y, grads=dict(given))
    assert loss_again == loss and grads.keys() == expected.keys()
    for name, value in expected.items():
        assert grads[name] is given[name], name
        np.testing.assert_array_equal(grads[name], value, err_msg=name)


@pytest.mark.parametrize("change", ["missing", "shape", "dtype", "readonly"])
def test_bad_gradient_arrays_are_named(change):
    model = FullyConnectedNet([4], input_dim=6, num_classes=3, dtype=np.float64, seed=0)
    grads = {name: np.zeros_like(w) for name, w in model.params.items()}
    if change == "missing":
        del grads["b1"]
    elif change == "shape":
        grads["b1"] = np.zeros(5)
    elif change == "dtype":
        grads["b1"] = grads["b1"].astype(np.float32)
    else:
        grads["b1"].flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\['b1'\] must be a writable float64 array of shape \(4,\)"):
        model.loss(np.zeros((2, 6)), np.array([0, 1]), grads=grads)
