"""Inside a job on an emulated cluster (launch/emulate.sh ... --script emulated_cluster.py MODE OUT):

- `where OUT.json`: rank 0 writes, for every rank, its hostname, its node's process count (MPI's COMM_TYPE_SHARED),
  the launcher's local count and UCX_TLS; and the seconds that sending BYTES (third argument) from rank 0 to the
  first process of the last node took, the median of 3 sends after a warm-up.
- `equivalence OUT.npz`: trains the cases of CASES (a part of solver_equivalence.CASES) with the Solver on the MPI
  world; rank 0 writes the results as solver_equivalence.main does (each case's with its exchange's `sharded` and
  `shared_memory`).
"""

import json
import os
import socket
import sys
import time

import numpy as np
import solver_equivalence

from dpnet.distributed import get_communicator

# replicated and sharded, synchronized batchnorm (its reducer crosses the nodes), each exchange in shared memory
# where it can (across nodes: inside each node) and through MPI's collectives alone ("unshared")
CASES = ("batchnorm-sgd_momentum", "layernorm-adam", "sharded-batchnorm-adam", "sharded-layernorm-adam-decay",
         "unshared-layernorm-adam", "sharded-unshared-batchnorm-sgd_momentum")


def where(path, nbytes):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
    me = dict(rank=world.rank, hostname=socket.gethostname(), node_size=node.Get_size(),
              local_ranks=os.environ.get("MPI_LOCALNRANKS"), ucx_tls=os.environ.get("UCX_TLS"))
    node.Free()
    everyone = world.gather(me, root=0)
    last = world.size - me["node_size"]  # block placement: the last node's first process
    if last == 0:
        raise SystemExit("emulated_cluster.py where: run it on 2 nodes or more")
    payload = np.ones(nbytes // 8)
    seconds = []
    for i in range(4):
        world.Barrier()
        start = time.perf_counter()
        if world.rank == 0:
            world.Send(payload, dest=last)
            world.Recv(payload[:1], source=last)  # the acknowledgement: the whole payload has arrived
        elif world.rank == last:
            world.Recv(payload, source=0)
            world.Send(payload[:1], dest=0)
        if i:
            seconds.append(time.perf_counter() - start)
    if world.rank == 0:
        with open(path, "w") as out:
            json.dump(dict(ranks=everyone, send_seconds=float(np.median(seconds)), bytes=payload.nbytes), out)


def equivalence(path):
    comm = get_communicator()
    results = {}
    for case in CASES:
        out = solver_equivalence.run(case, comm)
        results.update({f"{case}:{key}": value for key, value in out.items()})
    if comm.rank == 0:
        np.savez(path, size=comm.size, **results)


if __name__ == "__main__":
    if sys.argv[1] == "where":
        where(sys.argv[2], int(sys.argv[3]))
    else:
        equivalence(sys.argv[2])
