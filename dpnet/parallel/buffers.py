"""Buffers and checks over the processes' arrays: one fused buffer for many arrays, the reducer of synchronized batch
normalization, and the comparison of replicas."""

import collections
import hashlib

import numpy as np


class FusedBuffer:
    """Several arrays laid out back to back in one contiguous buffer (plus `extra` trailing slots), so that one
    collective moves them all: allocated once, then reused every step.

    Built from a dict of arrays (name -> ndarray; the buffer has their common dtype), in a new buffer or in the given
    1-D `buffer` (of that dtype and size: say, a NodeSharedArray's). `views[name]` is a view of the buffer shaped like
    arrays[name], starting at `offsets[name]`; `extra` views the trailing slots and `body` everything before them.
    `pack(arrays, scale)` writes scale * arrays into the buffer (the only copy), unless the arrays already are the
    views (a model that wrote its gradients into them), which are then scaled in place.
    """

    def __init__(self, arrays, extra=0, buffer=None):
        names = sorted(arrays)
        self.shapes = {name: np.shape(arrays[name]) for name in names}
        sizes = [int(np.prod(shape)) for shape in self.shapes.values()]
        dtype = np.result_type(*(arrays[name].dtype for name in names))
        if buffer is None:
            buffer = np.empty(sum(sizes) + extra, dtype=dtype)
        elif buffer.shape != (sum(sizes) + extra,) or buffer.dtype != dtype:
            raise ValueError(f"buffer must be a 1-D {dtype} array of {sum(sizes) + extra} elements, got "
                             f"{buffer.dtype} {buffer.shape}")
        self.buffer = buffer
        self.views, self.offsets, offset = {}, {}, 0
        for name, size in zip(names, sizes):
            self.views[name] = self.buffer[offset:offset + size].reshape(self.shapes[name])
            self.offsets[name] = offset
            offset += size
        self.body, self.extra = self.buffer[:offset], self.buffer[offset:]

    def matches(self, arrays):
        """Whether `arrays` has the names, shapes and dtype this buffer was laid out for."""
        return (arrays.keys() == self.views.keys() and all(np.shape(arrays[k]) == s for k, s in self.shapes.items())
                and np.result_type(*(arrays[k].dtype for k in self.shapes)) == self.buffer.dtype)

    def pack(self, arrays, scale=1):
        """buffer <- scale * arrays (same names and shapes as at construction, else ValueError). Returns the buffer."""
        if arrays.keys() != self.views.keys() or any(np.shape(arrays[k]) != s for k, s in self.shapes.items()):
            got = {name: np.shape(value) for name, value in sorted(arrays.items())}
            raise ValueError(f"the arrays changed since the fused buffer was laid out: expected {self.shapes}, "
                             f"got {got}")
        if all(arrays[name] is view for name, view in self.views.items()):
            if scale != 1:
                self.body *= scale
            return self.buffer
        for name, view in self.views.items():
            np.multiply(arrays[name], scale, out=view)
        return self.buffer


def make_reducer(comm):
    """A callable reduce_sum(a) -> new C-contiguous array (a's dtype) holding the element-wise sum of `a` over all
    processes, for synchronized batch normalization; None when comm has one process (local statistics are global)."""
    if comm.size == 1:
        return None

    def reduce_sum(a):
        return comm.allreduce(np.array(a, order="C", copy=True))

    return reduce_sum


def check_in_sync(comm, flat_params, where=""):
    """Raise RuntimeError on every rank unless `flat_params` (an array, or a sequence of arrays taken in order) is
    bitwise identical on all ranks. Collective.

    Each rank hashes its arrays (8-byte BLAKE2b) and all hashes are gathered through one allreduce; the ranks that
    disagree with the majority (ties: with rank 0) are named, and `where` (e.g. "after epoch 2") is added to the
    message. Data-parallel replicas apply the same update to the same reduced gradient, so any difference at all means
    they diverged.
    """
    arrays = [flat_params] if isinstance(flat_params, np.ndarray) else list(flat_params)
    hasher = hashlib.blake2b(digest_size=8)
    for array in arrays:  # one array at a time: no concatenated copy
        hasher.update(np.ascontiguousarray(array).view(np.uint8).ravel())
    hashes = np.zeros(comm.size, dtype=np.int64)
    hashes[comm.rank] = np.frombuffer(hasher.digest(), dtype=np.int64)[0]
    comm.allreduce(hashes)  # each slot is written by one rank only: the sum is a gather
    reference = collections.Counter(hashes.tolist()).most_common(1)[0][0]
    differ = [r for r in range(comm.size) if hashes[r] != reference]
    if differ:
        agree = [r for r in range(comm.size) if hashes[r] == reference]
        raise RuntimeError(f"parameters differ across processes{' ' + where if where else ''}: rank(s) {differ} "
                           f"disagree with rank(s) {agree} ({sum(a.size for a in arrays)} values checked); "
                           "the replicas have diverged")
