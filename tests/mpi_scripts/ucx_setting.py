"""Run under mpiexec -n N: rank 0 prints the UCX_TLS every rank had once dpnet's communicator had started MPI."""

import os

from dpnet.distributed import get_communicator

comm = get_communicator()
settings = comm.comm.gather(os.environ.get("UCX_TLS"), root=0)
if comm.rank == 0:
    print(" ".join(f"rank {rank} UCX_TLS={value}" for rank, value in enumerate(settings)), flush=True)
