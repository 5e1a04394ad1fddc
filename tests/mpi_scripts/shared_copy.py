"""Run under mpiexec -n N (one machine): dpnet.parallel.bcast_copy_on_write, through /dev/shm and without it;
rank 0 prints "ok <N> ranks" at the end."""

import os

import numpy as np

from dpnet.parallel import get_communicator, shared_copy

comm = get_communicator()
r, n = comm.rank, comm.size


def ours():
    return sorted(name for name in os.listdir(shared_copy.SHM_DIR) if name.startswith("dpnet-copy-"))


expected = np.concatenate([np.arange(10, dtype=np.float32), np.linspace(-1, 1, 5)])  # float32 and float64 parts
before = ours()
for through_file in (True, False):
    if not through_file:  # no room in /dev/shm: a plain broadcast, with the same results
        shared_copy.shared_memory_room = lambda: 0
    root = n - 1
    parts = [np.arange(10, dtype=np.float32), np.linspace(-1, 1, 5).reshape(5, 1)] if r == root else None
    copies = 2 if r == root else 1
    arrays = shared_copy.bcast_copy_on_write(comm, parts, 15, np.float64, copies=copies, root=root)
    assert len(arrays) == (copies if through_file else 1), arrays  # a plain array: one (a second would cost a copy)
    assert all(a.shape == (15,) and a.dtype == np.float64 for a in arrays), arrays
    assert all(np.array_equal(a, expected) for a in arrays), arrays
    mapped = [shared_copy.is_mapped(a) for a in arrays]
    assert mapped == [through_file] * len(arrays), (through_file, mapped)
    if r == root:
        assert ours() == before, ours()  # the file is gone already, whatever happens next
    arrays[0][:] = r  # a process's writes stay its own: nobody else's copy, nor its second one, changes
    comm.barrier()
    assert np.array_equal(arrays[0], np.full(15, r)) and all(np.array_equal(a, expected) for a in arrays[1:])
    if r == root:
        assert np.array_equal(parts[0], np.arange(10)), parts[0]
    comm.barrier()
    assert np.array_equal(arrays[0], np.full(15, r))
    empty = shared_copy.bcast_copy_on_write(comm, [np.zeros(0)] if r == 0 else None, 0, np.float32)
    assert empty[0].shape == (0,) and empty[0].dtype == np.float32

if r == 0:
    try:  # checked on root before anything collective
        shared_copy.bcast_copy_on_write(comm, [np.zeros(3)], 4, np.float64)
    except ValueError as exc:
        assert "3 elements" in str(exc), exc
    else:
        raise AssertionError("a size that disagrees with the parts was accepted")
    print(f"ok {n} ranks", flush=True)
