"""Sharded training gathers the whole gradient and optimizer state on rank 0 at epoch ends only when someone reads
them: `mpiexec -n N python solver_gathers.py`.

Three runs of 2 epochs: no monitor anywhere, a monitor on rank 0 alone, checkpoint_name on rank 0 alone. Every rank
prints how many times it took part in each gather (the gathers are collective: all ranks must agree).
"""

import tempfile

from toy import toy_data, toy_model

from dpnet.parallel import SharedShardedExchange, ShardedExchange, get_communicator
from dpnet.solver import Solver

counts = {"grads": 0, "configs": 0}
for cls in (ShardedExchange, SharedShardedExchange):
    def counted_grads(self, whole=False, _method=cls.summed_grads):
        counts["grads"] += bool(whole)
        return _method(self, whole)

    cls.summed_grads = counted_grads


def counted_configs(self, configs, _method=ShardedExchange.whole_configs):
    counts["configs"] += 1
    return _method(self, configs)


ShardedExchange.whole_configs = counted_configs


class Watch:
    def on_epoch_end(self, solver, info):
        pass


comm = get_communicator()
with tempfile.TemporaryDirectory() as folder:
    for run in ("nobody", "monitor", "checkpoints"):
        counts.update(grads=0, configs=0)
        root = comm.rank == 0
        solver = Solver(toy_model(), toy_data(), optim_config={"learning_rate": 1e-2}, batch_size=30, num_epochs=2,
                        seed=1, comm=comm, verbose=False, shard_optimizer=True,
                        monitors=[Watch()] if run == "monitor" and root else [],
                        checkpoint_name=f"{folder}/toy" if run == "checkpoints" and root else None)
        solver.train()
        print(f"rank {comm.rank} {run}: {counts['grads']} grads {counts['configs']} configs", flush=True)
