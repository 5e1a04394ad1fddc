"""A monitor on rank 0 stops training at iteration 4: `mpiexec -n N python solver_stop.py`.

Every rank prints the iteration it stopped at; all must stop at the same one and exit normally.
"""

from toy import toy_data, toy_model

from dpnet.distributed import get_communicator
from dpnet.solver import Solver


class StopAt4:
    def on_iteration_end(self, solver, info):
        if info["iteration"] == 4:
            solver.stop()


comm = get_communicator()
solver = Solver(toy_model(), toy_data(), optim_config={"learning_rate": 1e-2}, batch_size=30, num_epochs=3, seed=1,
                comm=comm, verbose=False, monitors=[StopAt4()])
solver.train()
print(f"rank {comm.rank} stopped at iteration {solver.iteration}", flush=True)
