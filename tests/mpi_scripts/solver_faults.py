"""Failures of a data-parallel Solver run: `mpiexec -n N python solver_faults.py MODE [DIR] [--sharded]`.

With --sharded the optimizer state is sharded (on one machine: parameters and gradients in shared memory).

MODE:
- fault: plain training; run it with DPNET_FAULT_INJECT="rank=R,step=S" (the Solver's fault_injection_point raises).
- nan: a huge learning rate makes the loss non-finite; each rank that raises FloatingPointError writes its message to
  DIR/rank<r>.txt and waits (at most 5 s) for the other ranks' files before re-raising, so that the test can see which
  ranks stopped and why (the first unhandled exception aborts the whole job).
- diverge: rank 1 adds 1e-3 to one weight at iteration 3; check_in_sync must stop every rank after epoch 1.
- exit: a monitor (on rank 0) calls sys.exit(5) at iteration 3 while the other ranks go on to the next collective.
Every rank prints "finished" if training ends normally (it must not, in any mode).
"""

import sys
import time
from pathlib import Path

from toy import toy_data, toy_model

from dpnet.distributed import get_communicator
from dpnet.solver import Solver

mode = sys.argv[1]
sharded = "--sharded" in sys.argv
comm = get_communicator()
data, model = toy_data(), toy_model()


class ExitAt3:
    def on_iteration_end(self, solver, info):
        if info["iteration"] == 3:
            sys.exit(5)


solver = Solver(model, data, optim_config={"learning_rate": 1e30 if mode == "nan" else 1e-2}, batch_size=30,
                num_epochs=3, seed=1, comm=comm, verbose=False, monitors=[ExitAt3()] if mode == "exit" else [],
                shard_optimizer=sharded)

if mode == "diverge" and comm.rank == 1:
    loss = model.loss

    def perturbed_loss(X, y=None):
        if y is not None and solver.iteration == 3:
            model.params["W1"][0, 0] += 1e-3
        return loss(X, y)

    model.loss = perturbed_loss

try:
    solver.train()
except FloatingPointError as exc:
    if mode != "nan":
        raise
    folder = Path(sys.argv[2])
    assert not solver.exchange.sharded or solver.exchange.shared_memory == sharded
    (folder / f"rank{comm.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    deadline = time.monotonic() + 5
    while len(list(folder.glob("rank*.txt"))) < comm.size and time.monotonic() < deadline:
        time.sleep(0.02)
    raise
print("finished on rank", comm.rank, flush=True)
