"""The communicators' documented import path (`from dpnet.distributed import get_communicator`): see dpnet.parallel."""

from .parallel import (FAULT_ENV, FusedBuffer, MPICommunicator, NodeSharedArray, SerialCommunicator,  # noqa: F401
                       block_counts, check_in_sync, fault_injection_point, get_communicator, install_abort_handler,
                       job_shared_memory_files, make_reducer, set_blas_threads)

reducer = make_reducer  # the name used in the original specification
