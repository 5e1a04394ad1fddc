import numpy as np

from dpnet import registry, testing
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.solver import Solver


def test_installed_and_correct():
    # found through the entry point; swish gradient-checked, lion checked
    testing.check_plugin("swish")


def test_swish_values():
    swish = registry.get_layer("activation", "swish")
    out, _ = swish.forward(np.array([-1.0, 0.0, 1.0]))
    assert np.allclose(out, [-1 / (1 + np.e), 0.0, 1 / (1 + np.exp(-1))])


def test_trains_a_network():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    data = {"X_train": X[:150], "y_train": y[:150],
            "X_val": X[150:], "y_val": y[150:]}
    model = FullyConnectedNet([20], input_dim=10, num_classes=2,
                              activation="swish", weight_scale=0.1, seed=0)
    solver = Solver(model, data, update_rule="lion",
                    optim_config={"learning_rate": 3e-3},
                    batch_size=25, num_epochs=20, verbose=False, seed=0)
    solver.train()
    assert solver.loss_history[-1] < 0.5 * solver.loss_history[0]
    assert solver.best_val_acc > 0.9
