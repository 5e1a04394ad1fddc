"""Run under mpiexec -n N with a folder as argument: each rank writes its pid to <folder>/pid<rank>; rank 0 then
sleeps in Python while the others block inside MPI_Allreduce, waiting for the test to signal one of them. Rank 0 also
writes the files of /dev/shm that MPICH made for the job to <folder>/segments."""

import os
import sys
import time

import numpy as np

from dpnet.distributed import get_communicator, job_shared_memory_files

comm = get_communicator()
comm.barrier()
if comm.rank == 0:
    with open(os.path.join(sys.argv[1], "segments"), "w") as out:
        out.write(" ".join(sorted(job_shared_memory_files())))
path = os.path.join(sys.argv[1], f"pid{comm.rank}")
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
if comm.rank == 0:
    time.sleep(60)
comm.allreduce(np.zeros(3))
