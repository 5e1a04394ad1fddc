"""Run under mpiexec -n N: checks the MPI communicator's collectives on every rank; rank 0 prints "ok <N> ranks" at the end."""

import os

import numpy as np

from dpnet.distributed import (MPICommunicator, SerialCommunicator, block_counts, check_in_sync, get_communicator,
                               make_reducer)

comm = get_communicator()
r, n = comm.rank, comm.size
assert isinstance(comm, MPICommunicator), type(comm)
assert n == int(os.environ["PMI_SIZE"]) > 1 and comm.is_root == (r == 0)

for dtype in (np.float32, np.float64, np.int64):
    for op, expected in (("sum", n * (n + 1) // 2), ("max", n), ("min", 1)):
        buf = np.full((2, 3), r + 1, dtype=dtype)
        out = comm.allreduce(buf, op=op)
        assert out is buf and buf.dtype == dtype, (op, dtype)
        assert (buf == expected).all(), (op, dtype, buf)

buf = np.arange(5, dtype=np.float64) if r == 0 else np.zeros(5)
assert comm.bcast(buf) is buf and (buf == np.arange(5)).all()
buf = np.full(3, r, dtype=np.int64)
comm.bcast(buf, root=n - 1)
assert (buf == n - 1).all()

for bad, error in ((np.zeros((4, 4))[:, 0], ValueError), ([1.0, 2.0], TypeError)):
    try:
        comm.allreduce(bad)
    except error as exc:
        assert "contiguous" in str(exc) or "NumPy" in str(exc), exc
    else:
        raise AssertionError(f"allreduce accepted {bad!r}")

# Block collectives, with equal blocks (the MPI block variants) and unequal ones (the v variants).
for counts in ([3] * n, block_counts(3 * n + 1, n), [0] * (n - 1) + [4]):
    displs = np.cumsum([0, *counts[:-1]])
    mine = slice(displs[r], displs[r] + counts[r])
    for dtype in (np.float32, np.float64):
        send = (np.arange(sum(counts)) + 100 * r).astype(dtype)
        recv = np.full(counts[r], -1, dtype=dtype)
        assert comm.reduce_scatter(send, recv, counts) is recv
        expected = n * np.arange(sum(counts)) + 100 * n * (n - 1) // 2
        assert (recv == expected[mine]).all(), (counts, recv)
        buf = np.full(sum(counts), -1, dtype=dtype)
        buf[mine] = 10 * r + np.arange(counts[r])
        assert comm.allgather(buf, counts) is buf
        assert (buf == np.concatenate([10 * q + np.arange(c) for q, c in enumerate(counts)])).all(), (counts, buf)
        part = np.full(counts[r], r, dtype=dtype)
        whole = np.full(sum(counts), -1, dtype=dtype) if r == 0 else None
        gathered = comm.gather(part, whole, counts)
        if r == 0:
            assert gathered is whole and (whole == np.repeat(np.arange(n), counts)).all(), (counts, whole)
        else:
            assert gathered is None
for call in (lambda: comm.reduce_scatter(np.zeros(5), np.zeros(1), [1] * n),  # 5 != sum of the counts
             lambda: comm.allgather(np.zeros(n), [1] * (n + 1))):  # one count per process
    try:
        call()
    except ValueError as exc:
        assert "sum(counts)" in str(exc), exc
    else:
        raise AssertionError("a block collective accepted bad counts")
serial = SerialCommunicator()
recv = np.zeros(3)
assert (serial.reduce_scatter(np.arange(3.0), recv, [3]) == [0, 1, 2]).all()
assert serial.shared_array(4, np.float32) is None

# Shared memory (every rank of these jobs runs on this machine): one array mapped by all, or one per process that all
# can read; a write is seen by every rank after sync().
one = comm.shared_array(7, np.float64)
assert one.array.shape == (7,) and one.array.dtype == np.float64 and one.of(n - 1) is one.array
if r == 0:
    one.array[...] = np.arange(7)
one.sync()
assert (one.array == np.arange(7)).all(), one.array
one.sync()  # everyone has read before anyone writes again
one.array[r] = -r  # each rank its own element: all of them are seen by all
one.sync()
assert (one.array[:n] == -np.arange(n)).all() and (one.array[n:] == np.arange(n, 7)).all(), one.array
each = comm.shared_array(3, np.float32, each=True)
each.array[...] = r
each.sync()
assert all((each.of(q) == q).all() for q in range(n))
assert not np.shares_memory(each.of(0), each.of(n - 1))
one.free()
each.free()
assert one.array is None
one.free()  # a second free does nothing
# Gradients summed where they lie: each process's block of the weighted sum over everyone's vectors, then (gather) the
# whole sum everywhere; equal weights take the add-then-scale path, unequal ones the scaled adds.
from dpnet.parallel import SharedSum  # noqa: E402

cases = [(dtype, weights) for dtype in (np.float64, np.float32)  # float32: weights like 1/3 are rounded in the slots
         for weights in ([1 / n] * n, [(q + 1) / (n * (n + 1) / 2) for q in range(n)])]
for dtype, weights in cases:
    arrays = {"W": np.zeros((5, 3), dtype), "b": np.zeros(1, dtype)}  # 15 + 1 + the caller's slot: 17, padded
    rtol = 1e-14 if dtype == np.float64 else 1e-6
    total = SharedSum.create(comm, arrays, extra=1)
    assert total.counts == [-(-17 // n)] * n and total.summed.size == n * total.counts[0] > 17
    total.vector.views["W"][...] = np.arange(15.0).reshape(5, 3) * (r + 1)
    total.vector.views["b"][...] = [r]
    total.vector.extra[0] = 10.0 * (r + 1)  # a caller's slot (the loss): summed like the rest
    total.sum_block(weights[r])
    total.gather()
    factor = sum(w * (q + 1) for q, w in enumerate(weights))
    np.testing.assert_allclose(total.vector.views["W"], np.arange(15.0).reshape(5, 3) * factor, rtol=rtol)
    np.testing.assert_allclose(total.vector.views["b"], [sum(w * q for q, w in enumerate(weights))], rtol=rtol)
    np.testing.assert_allclose(total.vector.extra[0], 10.0 * factor, rtol=rtol)
    assert (total.summed[17:] == 0).all()  # the padding stays zero
    total.free()
assert SharedSum.create(SerialCommunicator(), {"W": np.zeros(3)}) is None

import dpnet.parallel.communicators  # noqa: E402

room = dpnet.parallel.communicators.shared_memory_room
dpnet.parallel.communicators.shared_memory_room = lambda: 4096 if r == 0 else 2**40  # rank 0 decides for all
assert comm.shared_array(1024, np.float64) is None  # 8 KB do not fit in 4 KB: no shared memory, a note instead
held = comm.shared_array(300, np.float64)  # 2400 bytes fit, and then count against the room:
assert held is not None and comm.shared_array(300, np.float64) is None  # a second 2400 does not (a second note)
held.free()
assert comm.shared_array(300, np.float64) is not None  # freed, it fits again
assert dpnet.parallel.NodeSharedArray.live_bytes == 2400
dpnet.parallel.communicators.shared_memory_room = room

local = np.array([r + 1.0, 1.0], dtype=np.float32)
total = make_reducer(comm)(local)
assert total is not local and total.dtype == np.float32 and total.flags.c_contiguous
assert (total == [n * (n + 1) / 2, n]).all() and (local == [r + 1, 1]).all()

params = np.linspace(0, 1, 1000)
check_in_sync(comm, params)
if r == n - 1:
    params[17] += 1e-12
try:
    check_in_sync(comm, params)
except RuntimeError as exc:
    assert f"rank(s) [{n - 1}]" in str(exc), exc
else:
    raise AssertionError("check_in_sync missed a perturbed rank")
params[17] = 0.5  # the same everywhere again; now only the second of two arrays differs, on rank 0
second = np.ones(5) if r else np.zeros(5)
try:
    check_in_sync(comm, [params, second])
except RuntimeError as exc:
    assert "rank(s) [0]" in str(exc) or n == 2, exc  # two ranks: a tie, broken in rank 0's favour
else:
    raise AssertionError("check_in_sync missed a difference in the second array")

comm.barrier()  # reached only if every rank passed: a failed assertion aborts the job
if comm.is_root:
    print(f"ok {n} ranks", flush=True)
