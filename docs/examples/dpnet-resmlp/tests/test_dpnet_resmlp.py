import numpy as np

from dpnet import registry, testing
from dpnet.models import Sequential
from dpnet.solver import Solver

SPEC = [{"layer": "affine", "units": 16}, "resmlp_prelu", "resmlp_center",
        {"layer": "resmlp_block", "expansion": 2}, {"layer": "affine", "units": 2}]


def test_installed_and_correct():
    # found through the entry point; each layer check_layer-ed with its default options
    testing.check_plugin("resmlp")


def test_layers_with_options_and_images():
    def layer(name):
        return registry.get_layer("layer", name)

    testing.check_layer(layer("resmlp_prelu"), in_dim=(3, 4, 4), options={"slope": 0.1})
    testing.check_layer(layer("resmlp_center"), in_dim=(3, 4, 4), options={"momentum": 0.5})
    testing.check_layer(layer("resmlp_block"), in_dim=(6,), options={"expansion": 3})


def test_whole_models_gradient_check():
    testing.check_model(Sequential(SPEC, input_dim=(5,), reg=0.1, dtype=np.float64, seed=0))
    resmlp = registry.get_model("resmlp")
    testing.check_model(resmlp(width=8, blocks=2, num_classes=3, input_dim=(2, 3), dtype=np.float64, seed=0))


def test_centering_keeps_a_running_mean_for_test_mode():
    center = registry.get_layer("layer", "resmlp_center")
    state = {"mode": "train", "options": {"momentum": 0.5}}
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    out, _ = center.forward(x, {}, state)
    assert np.array_equal(out, [[-1.0, -2.0], [1.0, 2.0]])
    assert np.array_equal(state["running_mean"], [1.0, 2.0])  # 0.5 * 0 + 0.5 * [2, 4]
    state["mode"] = "test"
    out, _ = center.forward(x, {}, state)
    assert np.array_equal(out, [[0.0, 0.0], [2.0, 4.0]])


def test_trains_a_network():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # not linearly separable
    data = {"X_train": X[:150], "y_train": y[:150],
            "X_val": X[150:], "y_val": y[150:]}
    model = Sequential(SPEC, input_dim=10, seed=0)
    solver = Solver(model, data, update_rule="adam",
                    optim_config={"learning_rate": 1e-2},
                    batch_size=25, num_epochs=20, verbose=False, seed=0)
    solver.train()
    assert solver.loss_history[-1] < 0.5 * solver.loss_history[0]
    assert solver.best_val_acc > 0.8
