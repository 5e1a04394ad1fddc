"""Checkpoints of a sharded run: `mpiexec -n N python solver_sharded_checkpoint.py OUT_DIR`.

Trains the toy problem with adam and shard_optimizer for 4 epochs, writing `OUT_DIR/run_epoch_<k>.npz` (the optimizer
state gathered on rank 0 at each epoch end); then a second sharded Solver resumes from the epoch-2 checkpoint and
trains to epoch 4. Rank 0 writes both runs' final parameters to OUT_DIR/final.npz ("full/<name>", "resumed/<name>").
With a second argument `resume`, the job only resumes OUT_DIR/run_epoch_2.npz (written by a job of another size).
"""

import sys
from pathlib import Path

import numpy as np
from toy import SHARDED_OPTIONS as OPTIONS
from toy import toy_data, toy_model

from dpnet.checkpoint import restore_checkpoint
from dpnet.distributed import get_communicator
from dpnet.solver import Solver


def resume_only(out):
    """Another job (another process count) resumes OUT_DIR/run_epoch_2.npz sharded; rank 0 writes resumed_<P>.npz."""
    comm = get_communicator()
    resumed = Solver(toy_model(), toy_data(), comm=comm, **OPTIONS)
    restore_checkpoint(resumed, out / "run_epoch_2.npz")
    resumed.train()
    resumed.use_params("final")
    assert resumed.exchange.sharded
    if comm.rank == 0:
        np.savez(out / f"resumed_{comm.size}.npz", **resumed.model.params)


def main(out):
    comm = get_communicator()
    full = Solver(toy_model(), toy_data(), comm=comm, checkpoint_name=str(out / "run"), **OPTIONS)
    full.train()
    full.use_params("final")
    resumed = Solver(toy_model(), toy_data(), comm=comm, **OPTIONS)
    restore_checkpoint(resumed, out / "run_epoch_2.npz")
    resumed.train()
    resumed.use_params("final")
    assert full.exchange.sharded and resumed.exchange.sharded
    if comm.rank == 0:
        np.savez(out / "final.npz", **{f"full/{k}": v for k, v in full.model.params.items()},
                 **{f"resumed/{k}": v for k, v in resumed.model.params.items()})


if __name__ == "__main__":
    if sys.argv[2:] == ["resume"]:
        resume_only(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
