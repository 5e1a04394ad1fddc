"""Data parallelism: everything that knows there are several processes.

- communicators: move bytes (SerialCommunicator, MPICommunicator, get_communicator, as_communicator)
- exchange, sharded, hierarchical: how gradients are summed and parameters updated, chosen once (make_exchange);
  across machines, in each machine's shared memory first (hierarchical)
- buffers: FusedBuffer, the synchronized-batchnorm reducer, check_in_sync
- node_memory, shared_copy: memory the processes of one machine share
- environment: launcher variables, BLAS threads, UCX, /dev/shm; failures: the job-wide abort, fault injection
- watchdog: the collective watchdog (`dpnet-train --timeout`): a stopped or hung process ends the job, named
"""

from .buffers import FusedBuffer, check_in_sync, make_reducer
from .communicators import (MPICommunicator, SerialCommunicator, as_communicator, block_counts, check_buffer,
                            get_communicator)
from .environment import job_shared_memory_files, set_blas_threads
from .exchange import ReplicatedExchange, SharedReplicatedExchange, make_exchange
from .failures import FAULT_ENV, fault_injection_point, install_abort_handler
from .hierarchical import HierarchicalReplicatedExchange, HierarchicalShardedExchange, NodeGroups
from .node_memory import NodeSharedArray, SharedSum
from .shared_copy import bcast_arrays, bcast_copy_on_write, is_mapped
from .sharded import SharedShardedExchange, ShardedExchange, ShardError, check_shardable, is_shardable

__all__ = ["FAULT_ENV", "FusedBuffer", "HierarchicalReplicatedExchange", "HierarchicalShardedExchange",
           "MPICommunicator", "NodeGroups", "NodeSharedArray", "ReplicatedExchange", "SerialCommunicator",
           "ShardError", "SharedReplicatedExchange", "SharedShardedExchange", "SharedSum", "ShardedExchange",
           "as_communicator", "bcast_arrays", "bcast_copy_on_write", "block_counts", "check_buffer", "check_in_sync",
           "check_shardable", "fault_injection_point", "get_communicator", "install_abort_handler", "is_mapped",
           "is_shardable", "job_shared_memory_files", "make_exchange", "make_reducer", "set_blas_threads"]
