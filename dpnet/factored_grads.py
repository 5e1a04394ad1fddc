"""Each process computes its block of the summed weight gradients from every process's activations (one machine).

An affine layer's weight gradient is a product summed over the batch: dW = x.T @ dout, with x (N, D) the layer's
input and dout (N, M) the gradient of its output. In a data-parallel step with sharded state (dpnet.sharding) each
process needs only its block of the summed gradient, yet dpnet.shared_sum has every process compute the whole (D, M)
product of its own rows first, and then sums those P gradients: P whole gradients in memory, one per process.

Here, when every process runs on one machine, each process instead copies its rows of x and of weight * dout
(weight = n_r / N, its share of the global batch) into memory all processes share: N (D + M) numbers per layer, 6.3 MB
for the command line's model at batch 256 against its 14.7 MB gradient, once for the machine. After one barrier, each
process computes its block of every weight's gradient from everyone's rows, `x_all[:, rows].T @ dout_all`: the same
multiplications as before (a D/P share of the weight's rows over all N samples instead of all D rows over N/P
samples), no sum afterwards, and no process holds more than its block of a gradient. The other parameters' gradients
(biases, normalization scales) are small: each process writes them, weighted, into a shared slot of its own, and
every process adds up the entries its block needs, in rank order.

The model delivers its weight gradients as factors (`model.loss(X, y, weight_factors=callback)`, see
FullyConnectedNet.loss): callback(name, x, dout, reg) as its backward pass reaches each layer, the gradient being
x.T @ dout + reg * W. Ordering: a process writes its rows (in the backward pass) only after every process has finished
reading the last step's, which the sharded update's closing barrier guarantees.
"""

import numpy as np


def add_weight_block(x_all, dout_all, start, stop, out):
    """Write elements [start, stop) of the flattened product x_all.T @ dout_all (shape (D, M), row-major) into the 1-D
    array `out` (stop - start elements), computing only those elements: whole rows with one matrix product, the
    partial rows at either end with vector-matrix products. x_all (N, D), dout_all (N, M)."""
    columns = dout_all.shape[1]
    first_row, last_row = -(-start // columns), stop // columns  # the whole rows: [first_row, last_row)
    if first_row > last_row:  # start and stop lie within one row
        row = start // columns
        np.matmul(x_all[:, row], dout_all[:, start % columns:stop % columns], out=out)
        return out
    head = first_row * columns - start
    if head:
        np.matmul(x_all[:, first_row - 1], dout_all[:, columns - head:], out=out[:head])
    if last_row > first_row:
        body = out[head:head + (last_row - first_row) * columns].reshape(last_row - first_row, columns)
        np.matmul(x_all[:, first_row:last_row].T, dout_all, out=body)
    tail = stop - last_row * columns
    if tail:
        np.matmul(x_all[:, last_row], dout_all[:, :tail], out=out[len(out) - tail:])
    return out


class FactoredGradients:
    """The shared rows of the factored weights, and the shared slots of the other gradients, of a ShardedState
    (`layout`: names, shapes, offsets, this process's block lo:hi) for global batches of up to `capacity` samples.

    Per step: `start(rows, weight, batch)` (this process's rows of the global batch, its weight n_r / N, the global
    batch size), then the model's loss with `rest_grads` as its gradient arrays and `receive` as its weight_factors
    callback, then `sum_block(block, params)` (collective), which writes every element of the block that holds a
    parameter (the padding after the last one is left as it is). Make one with `create()`, which gives None when the
    processes cannot share memory.
    """

    @classmethod
    def create(cls, comm, layout, factored, capacity):
        """Collective: for `factored` (names of 2-D parameters of layout) and batches of up to `capacity`, or None."""
        get_shared = getattr(comm, "shared_array", None)
        if get_shared is None or comm.size == 1:
            return None
        factored = sorted(factored)
        rows_size = capacity * sum(sum(layout.shapes[name]) for name in factored)
        rest = {name: layout.shapes[name] for name in layout.names if name not in factored}
        rows = get_shared(max(rows_size, 1), layout.dtype)
        slots = None
        if rows is not None:  # each process's slot: the other gradients, then its weight
            slots = get_shared(sum(int(np.prod(shape)) for shape in rest.values()) + 1, layout.dtype, each=True)
        if slots is None:
            if rows is not None:
                rows.free()
            return None
        return cls(comm, layout, factored, capacity, rows, slots, rest)

    def __init__(self, comm, layout, factored, capacity, rows, slots, rest):
        self.comm, self.layout, self.factored, self.capacity = comm, layout, factored, capacity
        self._rows, self._slots = rows, slots
        self._inputs, self._douts, at = {}, {}, 0
        for name in factored:
            fan_in, fan_out = layout.shapes[name]
            self._inputs[name] = rows.array[at:at + capacity * fan_in].reshape(capacity, fan_in)
            at += capacity * fan_in
            self._douts[name] = rows.array[at:at + capacity * fan_out].reshape(capacity, fan_out)
            at += capacity * fan_out
        self.rest_grads, self._rest_offsets, at = {}, {}, 0  # views of this process's slot
        for name in sorted(rest):
            size = int(np.prod(rest[name]))
            self._rest_offsets[name] = at
            self.rest_grads[name] = slots.array[at:at + size].reshape(rest[name])
            at += size
        self._regs = {}
        self._step_rows = None

    def start(self, rows, weight, batch):
        """Before the model's loss: this process holds rows `rows` (a slice) of a global batch of `batch` samples and
        its gradient counts with `weight`."""
        if batch > self.capacity:
            raise ValueError(f"a global batch of {batch} samples does not fit the {self.capacity} laid out")
        self._step_rows, self._batch, self._weight = rows, batch, weight
        self._slots.array[-1] = weight
        self._regs.clear()

    def receive(self, name, x, dout, reg=0.0):
        """The model's weight_factors callback: the gradient of `name` is x.T @ dout + reg * W, x (n, D) and dout
        (n, M) being this process's rows; they are copied into the shared rows (dout times the weight)."""
        if name not in self._inputs:
            raise KeyError(f"{name!r} is not a factored weight of this layout ({', '.join(self.factored)})")
        rows = self._step_rows
        self._inputs[name][rows] = x
        np.multiply(dout, self._weight, out=self._douts[name][rows])
        self._regs[name] = reg

    def sum_block(self, block, params):
        """Collective: this process's block (layout.lo:hi) of the weighted sum of every process's gradient, written into
        `block`, from the rows and slots every process wrote this step; `params` is the flat parameter vector (for the
        reg terms). Returns block."""
        missing = [name for name in self.factored if name not in self._regs]
        if missing:
            raise RuntimeError(f"the model's loss did not deliver the factors of {', '.join(missing)}")
        self._slots.sync()
        lo, hi, n = self.layout.lo, self.layout.hi, self._batch
        for name in self.layout.names:
            first = self.layout.offsets[name]
            size = int(np.prod(self.layout.shapes[name]))
            start, stop = max(lo - first, 0), min(hi - first, size)
            if start >= stop:
                continue
            out = block[first + start - lo:first + stop - lo]
            if name in self._inputs:
                add_weight_block(self._inputs[name][:n], self._douts[name][:n], start, stop, out)
                if self._regs[name]:
                    out += self._regs[name] * params[first + start:first + stop]
            else:
                at = self._rest_offsets[name]
                out[...] = 0
                for rank in range(self.comm.size):  # in rank order, on every process alike
                    slot = self._slots.of(rank)
                    out += slot[-1] * slot[at + start:at + stop]
        return block

    def free(self):
        """Collective: release the shared memory."""
        self._rows.free()
        self._slots.free()
