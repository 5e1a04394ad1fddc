"""Training on the real CIFAR-10: the seed's overfitting check and its accuracy targets.

These read the data from $DPNET_TEST_DATA_DIR (see the cifar10_dir fixture) and print each run's accuracy and wall
time (shown with `pytest -s`, and in the report's captured output).
"""

import time

import numpy as np
import pytest

from dpnet.classifiers.fc_net import FullyConnectedNet, TwoLayerNet
from dpnet.data_utils import get_CIFAR10_data
from dpnet.solver import Solver


@pytest.fixture(scope="module")
def data(cifar10_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("DPNET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return get_CIFAR10_data(data_dir=cifar10_dir, lazy=True, dtype=np.float32)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _report(name, solver, started, test_acc=None):
    extra = f", test {test_acc:.3f}" if test_acc is not None else ""
    print(f"\n{name}: best val {solver.best_val_acc:.3f}{extra}, final train {solver.train_acc_history[-1]:.3f}, "
          f"{time.perf_counter() - started:.1f} s")


@pytest.mark.parametrize("hidden_dims, weight_scale, learning_rate", [
    ([100, 100], 0.0278244248968823, 0.002850013874539408),  # the seed's three-layer values
    ([100, 100, 100, 100], 5e-2, 1e-2),
])
def test_overfits_50_images_within_20_epochs(data, hidden_dims, weight_scale, learning_rate):
    small = {"X_train": np.asarray(data["X_train"][:50], dtype=np.float64), "y_train": data["y_train"][:50],
             "X_val": data["X_val"], "y_val": data["y_val"]}
    np.random.seed(0)
    model = FullyConnectedNet(hidden_dims, weight_scale=weight_scale, dtype=np.float64)
    solver = Solver(model, small, update_rule="sgd", optim_config={"learning_rate": learning_rate}, lr_decay=0.95,
                    num_epochs=20, batch_size=25, verbose=False, seed=0)
    started = time.perf_counter()
    solver.train()
    _report(f"{len(hidden_dims) + 1}-layer overfit", solver, started)
    assert max(solver.train_acc_history) == 1.0


def test_two_layer_net_reaches_the_seeds_50_percent(data):
    """The seed's cell: TwoLayerNet, sgd 1e-3, lr_decay 0.95, 10 epochs of batch 100."""
    np.random.seed(0)
    solver = Solver(TwoLayerNet(), data, update_rule="sgd", optim_config={"learning_rate": 1e-3}, lr_decay=0.95,
                    num_epochs=10, batch_size=100, print_every=1000, seed=0)
    started = time.perf_counter()
    solver.train()
    _report("TwoLayerNet", solver, started)
    assert solver.best_val_acc >= 0.50


def test_batchnorm_dropout_adam_net_reaches_55_percent(data):
    model = FullyConnectedNet([512, 256], normalization="batchnorm", dropout=0.85, weight_scale=1e-2, seed=0)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3}, lr_decay=0.85,
                    num_epochs=8, batch_size=200, verbose=False, seed=0)
    started = time.perf_counter()
    solver.train()
    test_acc = solver.check_accuracy(data["X_test"], data["y_test"])
    _report("FullyConnectedNet [512, 256] batchnorm dropout adam", solver, started, test_acc)
    assert solver.best_val_acc >= 0.55
