"""Test-time flip averaging (dpnet.flip_average.FlipAveraged, `--test-flips`): the scores it gives, that it is the
model it wraps for everything else (training bit for bit, checkpoints, the average of the parameters, mixing), and
that load_model rebuilds it. The command line's runs, evaluate, predict and export: tests/test_use_model.py; N
processes against one: tests/test_train.py."""

import copy

import numpy as np
import pytest

import dpnet
from dpnet import train
from dpnet.augment import Augmentation
from dpnet.checkpoint import load_checkpoint, restore_checkpoint
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.flip_average import FlipAveraged, unwrap
from dpnet.mixing import Mixing
from dpnet.models import Sequential
from dpnet.solver import Solver

SHAPE = (3, 6, 6)


def _images(n, seed, num_classes=4):
    """Images (n, 3, 6, 6) of num_classes blobs that are not left-right symmetric, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((num_classes, *SHAPE)) * 2
    y = rng.integers(num_classes, size=n)
    return centres[y] + rng.standard_normal((n, *SHAPE)), y


@pytest.fixture
def data():
    (X_train, y_train), (X_val, y_val) = _images(240, 0), _images(60, 1)
    return dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val)


def _fc(**kwargs):
    kwargs = {"input_dim": int(np.prod(SHAPE)), "num_classes": 4, "weight_scale": 0.1, "seed": 0, **kwargs}
    return FullyConnectedNet([16, 12], **kwargs)


def _seq(**kwargs):
    return Sequential([{"layer": "affine", "units": 16}, "batchnorm", "relu", {"layer": "dropout", "keep": 0.8},
                       {"layer": "affine", "units": 4}], input_dim=SHAPE, seed=0, **kwargs)


# ----------------------------------------------------------------------------------------------- the scores
@pytest.mark.parametrize("make", [lambda: _fc(normalization="batchnorm", dropout=0.8),
                                  lambda: _fc(normalization="layernorm", dtype=np.float64), _seq],
                         ids=["fc-batchnorm", "fc-layernorm-float64", "sequential"])
def test_test_scores_are_the_mean_of_the_images_and_their_mirrors_scores(make):
    model = make()
    model.loss(*_images(20, 2))  # a training step's forward: running statistics of their own
    X = _images(7, 3)[0]
    wrapped = FlipAveraged(model)
    expected = (model.loss(X) + model.loss(np.ascontiguousarray(X[:, :, :, ::-1]))) * 0.5
    scores = wrapped.loss(X)
    assert scores.dtype == model.loss(X).dtype and scores.shape == (7, 4)
    assert np.array_equal(scores, expected)  # bit for bit
    assert not np.allclose(scores, model.loss(X))  # (the mirrors do count)
    assert np.array_equal(wrapped.loss(X[..., ::-1]), scores)  # an image and its mirror: the same scores


def test_the_wrapper_is_the_model_for_everything_but_test_scores():
    model = _fc(normalization="batchnorm", dropout=0.8, reg=0.01)
    wrapped = FlipAveraged(model)
    assert dpnet.models.FlipAveraged is FlipAveraged and unwrap(wrapped) is model and unwrap(model) is model
    assert wrapped.params is model.params and wrapped.bn_params is model.bn_params
    assert wrapped.dropout_param is model.dropout_param and wrapped.num_classes == 4 and wrapped.reg == 0.01
    assert wrapped.soft_targets is True and wrapped.dtype == np.float32 and wrapped.input_dim == 108
    wrapped.mean_image = "set through the wrapper"
    assert model.mean_image == "set through the wrapper"
    assert getattr(wrapped, "no_such_attribute", None) is None  # AttributeError, as the model's
    with pytest.raises(AttributeError):
        wrapped.model = _fc()
    twin = copy.deepcopy(wrapped)
    assert isinstance(twin, FlipAveraged) and twin.params is not model.params
    assert all(np.array_equal(twin.params[name], w) for name, w in model.params.items())
    # Training: the model's loss and gradients, bit for bit, into given arrays as the Solver passes them.
    X, y = _images(10, 4)
    model.dropout_param["seed"] = 7  # the same mask in both calls
    loss, grads = model.loss(X, y)
    out = {name: np.full_like(w, np.nan) for name, w in model.params.items()}
    wrapped_loss, filled = wrapped.loss(X, y, grads=out)
    assert wrapped_loss == loss and filled is out
    assert all(np.array_equal(out[name], grads[name]) for name in grads)


def test_a_model_whose_loss_takes_no_grads_has_its_gradients_copied_into_the_given_arrays():
    class Linear:
        def __init__(self):
            self.params = {"W": np.arange(108 * 3, dtype=np.float64).reshape(108, 3) / 1000}

        def loss(self, X, y=None):
            scores = X.reshape(len(X), -1) @ self.params["W"]
            if y is None:
                return scores
            return float(scores.sum()), {"W": X.reshape(len(X), -1).T @ np.ones_like(scores)}

    model, X = Linear(), _images(5, 6)[0]
    out = {"W": np.zeros((108, 3))}
    _, grads = FlipAveraged(model).loss(X, np.zeros(5, dtype=int), grads=out)
    assert grads is out and np.array_equal(out["W"], model.loss(X, np.zeros(5, dtype=int))[1]["W"])
    assert np.array_equal(FlipAveraged(model).loss(X), (model.loss(X) + model.loss(X[..., ::-1])) * 0.5)


def test_inputs_that_are_not_images_are_refused():
    with pytest.raises(ValueError, match=r"test-time flips need a model of images \(C, H, W\); this Sequential takes "
                                         r"inputs of shape \(108,\)"):
        FlipAveraged(Sequential([{"layer": "affine", "units": 4}], input_dim=108))
    wrapped = FlipAveraged(_fc())
    with pytest.raises(ValueError, match=r"X has shape \(5, 108\): test-time flips need images \(N, C, H, W\)"):
        wrapped.loss(np.zeros((5, 108)))
    with pytest.raises(ValueError, match=r"X has shape \(5, 3, 36\): test-time flips need images \(N, 3, 6, 6\)"):
        FlipAveraged(_seq()).loss(np.zeros((5, 3, 36)))
    with pytest.raises(ValueError, match="already averages"):
        FlipAveraged(wrapped)


def test_the_command_line_refuses_test_flips_for_a_model_of_vectors():
    original = train._build_model
    try:
        train._build_model = lambda config: Sequential([{"layer": "affine", "units": 10}], input_dim=3072)
        config = {**train.DEFAULTS, "test_flips": True}
        with pytest.raises(train.UsageError, match=r"--test-flips: test-time flips need a model of images"):
            train.build_model(config)
        assert isinstance(train.build_model({**config, "test_flips": False}), Sequential)
    finally:
        train._build_model = original
    assert isinstance(train.build_model({**train.DEFAULTS, "hidden_dims": [8], "test_flips": True}), FlipAveraged)


# ----------------------------------------------------------------------------------------------- training
def _solve(model, data, **kwargs):
    options = dict(update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=40, num_epochs=2,
                   num_train_samples=100, seed=3, verbose=False, weight_decay=1e-3, ema_decay=0.9, ema_every=2,
                   augment=Augmentation(crop_padding=1), mixing=Mixing(mixup=0.4, cutmix=1.0, probability=0.7))
    solver = Solver(model, data, **{**options, **kwargs})
    solver.train()
    return solver


@pytest.mark.parametrize("make", [lambda: _fc(normalization="batchnorm", dropout=0.8), _seq],
                         ids=["fc", "sequential"])
def test_training_with_test_flips_gives_the_same_parameters_bit_for_bit(make, data, tmp_path):
    """Crops and flips, MixUp and CutMix, dropout, batchnorm and the average of the parameters: the wrapper changes
    no bit of training. Only the accuracies (and so, perhaps, which parameters are the best) are its own."""
    plain = _solve(make(), data)
    flipped = _solve(FlipAveraged(make()), data, checkpoint_name=str(tmp_path / "run"))
    assert flipped.loss_history == plain.loss_history
    for name in plain.final_params:
        assert np.array_equal(flipped.final_params[name], plain.final_params[name]), name
    for key in plain.final_norm_state:
        assert np.array_equal(flipped.final_norm_state[key], plain.final_norm_state[key]), key
    assert sorted(flipped.ema.arrays) == sorted(plain.ema.arrays)
    assert all(np.array_equal(flipped.ema.arrays[k], plain.ema.arrays[k]) for k in plain.ema.arrays)
    assert flipped.train_acc_history != plain.train_acc_history or flipped.val_acc_history != plain.val_acc_history
    inner = unwrap(flipped.model)
    X, y = data["X_val"], data["y_val"]
    for which in ("final", "best"):
        flipped.use_params(which)
        by_hand = np.mean(np.argmax(inner.loss(X) + inner.loss(X[..., ::-1]), axis=1) == y)
        assert flipped.check_accuracy(X, y) == by_hand
    assert flipped.best_val_acc == max(flipped.val_acc_history + flipped.ema_val_acc_history)

    # The checkpoint records the wrapped model and test_flips; load_model wraps it again.
    path = tmp_path / "run_epoch_2.npz"
    meta = load_checkpoint(path)[1]
    assert meta["model"] == type(inner).__name__ and meta["test_flips"] is True
    assert meta["architecture"]["type"] == type(inner).__name__
    loaded = dpnet.load_model(path, which="final")
    assert isinstance(loaded, FlipAveraged) and type(unwrap(loaded)) is type(inner)
    flipped.use_params("final")
    assert np.array_equal(loaded.loss(X), flipped.model.loss(X))
    alone = dpnet.load_model(path, which="final", test_flips=False)
    assert type(alone) is type(inner) and np.array_equal(alone.loss(X), inner.loss(X))
    with pytest.raises(ValueError, match="test_flips must be None, True or False"):
        dpnet.load_model(path, test_flips="yes")
    # and a Solver of the wrapped model (or of the model alone) resumes from it
    for model in (FlipAveraged(make()), make()):
        solver = Solver(model, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=40,
                        num_epochs=2, seed=3, verbose=False, ema_decay=0.9, ema_every=2)
        restore_checkpoint(solver, path)
        assert solver.iteration == flipped.iteration and np.array_equal(
            solver.model.params[next(iter(inner.params))], flipped.final_params[next(iter(inner.params))])


def test_a_plain_checkpoint_loads_with_test_flips_on_request(data, tmp_path):
    solver = _solve(_fc(normalization="batchnorm"), data, num_epochs=1, checkpoint_name=str(tmp_path / "p"),
                    ema_decay=None, mixing=None)
    meta = load_checkpoint(tmp_path / "p_epoch_1.npz")[1]
    assert meta["test_flips"] is False
    X = data["X_val"]
    model = dpnet.load_model(tmp_path / "p_epoch_1.npz")
    assert type(model) is FullyConnectedNet and np.array_equal(model.loss(X), solver.model.loss(X))
    flipped = dpnet.load_model(tmp_path / "p_epoch_1.npz", test_flips=True)
    assert isinstance(flipped, FlipAveraged)
    assert np.array_equal(flipped.loss(X), FlipAveraged(solver.model).loss(X))


def test_wrapping_the_loss_of_a_flip_averaged_model_wraps_the_averaging_loss():
    inner = FullyConnectedNet([5], input_dim=3 * 4 * 4, num_classes=3, seed=0, dtype=np.float64)
    model = FlipAveraged(inner)
    averaging = model.loss
    calls = []

    def counted(X, y=None, grads=None):  # as the benchmarks sample memory around a model's loss
        calls.append(len(X))
        return averaging(X, y, grads=grads)

    model.loss = counted
    X = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    expected = (inner.loss(X) + inner.loss(X[..., ::-1])) * 0.5
    np.testing.assert_array_equal(model.loss(X), expected)
    assert calls == [2] and inner.loss.__func__ is FullyConnectedNet.loss  # the inner model is untouched
    del model.loss
    np.testing.assert_array_equal(model.loss(X), expected)

