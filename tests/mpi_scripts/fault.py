"""Run under mpiexec with DPNET_FAULT_INJECT set: every rank loops over steps of one allreduce each; the injected
fault must end the whole job (the other ranks are then blocked in allreduce). Rank 0 first prints the files of
/dev/shm that MPICH made for the job (the test checks that the abort removed them)."""

import numpy as np

from dpnet.distributed import fault_injection_point, get_communicator, job_shared_memory_files

comm = get_communicator()
buf = np.zeros(8)
comm.allreduce(buf)
if comm.rank == 0:
    print("segments:", *sorted(job_shared_memory_files()), flush=True)
for step in range(1000):
    fault_injection_point(comm, step)
    comm.allreduce(buf)
print("finished without a fault on rank", comm.rank, flush=True)
