"""A monitor on rank 0 stops training at iteration 4: `mpiexec -n N python solver_stop.py`.

Every rank prints the iteration it stopped at; all must stop at the same one and exit normally.
"""

import numpy as np

from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.distributed import get_communicator
from dpnet.solver import Solver


class StopAt4:
    def on_iteration_end(self, solver, info):
        if info["iteration"] == 4:
            solver.stop()


comm = get_communicator()
rng = np.random.default_rng(0)
y = rng.integers(5, size=400)
X = rng.standard_normal((400, 3, 4, 4)) + y[:, None, None, None]
data = dict(X_train=X[:300], y_train=y[:300], X_val=X[300:], y_val=y[300:])
model = FullyConnectedNet([20], input_dim=48, num_classes=5, weight_scale=0.1, dtype=np.float64, seed=0)
solver = Solver(model, data, optim_config={"learning_rate": 1e-2}, batch_size=30, num_epochs=3, seed=1, comm=comm,
                verbose=False, monitors=[StopAt4()])
solver.train()
print(f"rank {comm.rank} stopped at iteration {solver.iteration}", flush=True)
