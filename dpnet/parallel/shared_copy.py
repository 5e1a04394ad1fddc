"""One array for every process of a machine, held in memory once: a broadcast whose copies are copy-on-write.

`bcast_copy_on_write(comm, parts, size, dtype)` gives every process root's arrays `parts`, back to back in one new
array, like a broadcast. When all processes run on one machine, root writes them into a file in /dev/shm and every
process maps that file privately (MAP_PRIVATE): the processes read the same physical pages until one writes to its
array, and then only the pages it writes become its own. Root unlinks the file before the call returns, so nothing is
left behind and the memory goes when the last process drops its array (an ordinary NumPy array whose base is the
mapping: no collective free, and a change on one process never reaches another, as with a broadcast).

This is how the data-parallel Solver hands every process the trained model: identical replicas, read by most processes
and written by none, each a parameter-sized copy otherwise.
"""

import mmap
import os
import tempfile

import numpy as np

from .environment import SHM_DIR, shared_memory_room
from .node_memory import NodeSharedArray

_NAME_BYTES = 4096  # the broadcast file name, NUL-padded (PATH_MAX)


def bcast_copy_on_write(comm, parts, size, dtype, copies=1, root=0, shared=True):
    """Collective: root's `parts` (a sequence of arrays, taken flat and back to back and cast to `dtype`: `size`
    elements in all; ignored, may be None, on the other processes) as new 1-D arrays on every process, in a list.

    On one machine the list holds `copies` arrays (`copies` may differ between processes), each a private
    copy-on-write mapping of one file in /dev/shm (see the module's docstring): any number of them cost one copy in
    memory until written to. Across machines, without room in /dev/shm, if the file cannot be written or mapped, or
    with shared=False, the list holds one plain array filled by comm.bcast, whatever `copies` says: a second one would
    cost a second copy (make it if it is needed). Every array is writable, and changing it changes no other array,
    here or elsewhere, nor `parts`.
    """
    dtype = np.dtype(dtype)
    if comm.rank == root:
        parts = [np.asarray(part) for part in parts]
        if sum(part.size for part in parts) != size:
            raise ValueError(f"bcast_copy_on_write: root's parts hold {sum(part.size for part in parts)} elements, "
                             f"size says {size}")
    arrays = None
    if shared and comm.size > 1 and size > 0 and comm.local_size() == comm.size:
        arrays = _share_through_file(comm, parts, size, dtype, copies, root)
    if arrays is None:
        first = np.empty(size, dtype=dtype)
        if comm.rank == root:
            offset = 0
            for part in parts:
                first[offset:offset + part.size] = part.ravel()
                offset += part.size
        comm.bcast(first, root=root)
        arrays = [first]
    return arrays


def is_mapped(array):
    """Whether `array` (or what it views) lies in a memory mapping (an mmap.mmap), as the shared copies of
    bcast_copy_on_write do, rather than in memory of the process's own allocator."""
    while array is not None and not isinstance(array, mmap.mmap):
        array = array.obj if isinstance(array, memoryview) else getattr(array, "base", None)
    return array is not None


def _share_through_file(comm, parts, size, dtype, copies, root):
    """`copies` copy-on-write mappings of the file root writes, on every process; None on every process if any of them
    failed."""
    name = np.zeros(_NAME_BYTES, dtype=np.uint8)
    if comm.rank == root:
        path = _write_file(parts, size * dtype.itemsize, dtype)
        if path is not None:
            encoded = os.fsencode(path)
            name[:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    comm.bcast(name, root=root)
    path = os.fsdecode(name.tobytes().rstrip(b"\0"))
    if not path:
        return None
    try:
        with open(path, "rb") as file:  # the mappings outlive the descriptor
            arrays = [np.frombuffer(mmap.mmap(file.fileno(), size * dtype.itemsize, access=mmap.ACCESS_COPY),
                                    dtype=dtype, count=size) for _ in range(copies)]
    except (OSError, ValueError):
        arrays = None
    everyone = comm.allreduce(np.array([arrays is not None], dtype=np.int64), op="min")  # and all have mapped it
    if comm.rank == root:
        os.unlink(path)
    return arrays if everyone[0] else None


def _write_file(parts, nbytes, dtype):
    """The path of a new file in /dev/shm holding `parts` back to back as `dtype`; None when there is no room (this
    job's shared arrays may still fill their untouched pages) or writing fails."""
    room = shared_memory_room()
    if room is None or room - NodeSharedArray.live_bytes < nbytes:
        return None
    path = None
    try:
        descriptor, path = tempfile.mkstemp(prefix="dpnet-copy-", dir=SHM_DIR)
        with os.fdopen(descriptor, "wb") as file:
            for part in parts:  # one part at a time: no packed copy of the whole
                np.ascontiguousarray(part, dtype=dtype).tofile(file)
        return path
    except OSError:
        if path is not None:
            os.unlink(path)
        return None


def bcast_arrays(comm, template, arrays, copies=1, root=0, shared=True):
    """Collective: root's `arrays` (name -> ndarray; ignored elsewhere) on every process, as a list of dicts of new
    arrays shaped and typed like `template` (name -> ndarray, the same names, shapes and dtypes on every process).

    One broadcast through bcast_copy_on_write moves them all, laid out by sorted name in their common dtype: on one
    machine the list holds `copies` dicts whose arrays are copy-on-write mappings of one copy in memory; else one."""
    names = sorted(template)
    size = sum(template[name].size for name in names)
    dtype = np.result_type(*(template[name].dtype for name in names))
    parts = [arrays[name] for name in names] if comm.rank == root else None
    buffers = bcast_copy_on_write(comm, parts, size, dtype, copies=copies, root=root, shared=shared)
    copied = []
    for buffer in buffers:
        views, offset = {}, 0
        for name in names:
            n = template[name].size
            views[name] = buffer[offset:offset + n].reshape(template[name].shape).astype(template[name].dtype,
                                                                                          copy=False)
            offset += n
        copied.append(views)
    return copied
