"""The small problem the Solver scripts train on: 300 training and 100 validation samples of shape (3, 4, 4), 5
classes shifted apart, and a one-hidden-layer float64 net; and the Solver options of the sharded checkpoint job."""

import numpy as np

from dpnet.classifiers.fc_net import FullyConnectedNet


def toy_data():
    rng = np.random.default_rng(0)
    y = rng.integers(5, size=400)
    X = rng.standard_normal((400, 3, 4, 4)) + y[:, None, None, None]
    return dict(X_train=X[:300], y_train=y[:300], X_val=X[300:], y_val=y[300:])


def toy_model():
    return FullyConnectedNet([20], input_dim=48, num_classes=5, weight_scale=0.1, dtype=np.float64, seed=0)


SHARDED_OPTIONS = dict(update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=30, num_epochs=4, seed=5,
                       lr_decay=0.9, weight_decay=0.1, verbose=False, shard_optimizer=True)
