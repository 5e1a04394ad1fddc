"""Run under mpiexec with DPNET_FAULT_INJECT set: every rank loops over steps of one allreduce each; the injected
fault must end the whole job (the other ranks are then blocked in allreduce)."""

import numpy as np

from dpnet.distributed import fault_injection_point, get_communicator

comm = get_communicator()
buf = np.zeros(8)
for step in range(1000):
    fault_injection_point(comm, step)
    comm.allreduce(buf)
print("finished without a fault on rank", comm.rank, flush=True)
