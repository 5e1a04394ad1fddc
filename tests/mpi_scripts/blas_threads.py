"""Run under mpiexec -n N: rank 0 prints a JSON list with, per rank, the BLAS threads set, the thread counts that
threadpoolctl reports for the BLAS libraries, and comm.local_size()."""

import json

import numpy as np
from threadpoolctl import threadpool_info

from dpnet.distributed import get_communicator, set_blas_threads

comm = get_communicator()
n = set_blas_threads(comm=comm)
pools = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"] or [0]
table = np.zeros((comm.size, 4), dtype=np.int64)  # gathered through allreduce: one writer per row
table[comm.rank] = n, min(pools), max(pools), comm.local_size()
comm.allreduce(table)
if comm.is_root:
    print(json.dumps([dict(set=int(a), blas_min=int(b), blas_max=int(c), local_size=int(d)) for a, b, c, d in table]))
