"""Batch centering, a layer with state: subtracts the mean over the batch, the global batch of all processes in a
data-parallel run, and keeps a running mean for test mode."""

import numpy as np

MOMENTUM = 0.9


def center_init(in_dim, rng, dtype, momentum=MOMENTUM):
    """No parameters; the output has the input's shape. Option momentum: of the running mean, in [0, 1)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return {}, tuple(in_dim)


def center_forward(x, params, state):
    """out = x - mean. Training: the mean of the batch, also folded into the running mean,
    state["running_mean"] = momentum * running_mean + (1 - momentum) * mean; test: the running mean.

    With several processes state["reducer"] sums an array over all of them: the mean is then that of the global
    batch, the same on every process. Input x (N, *in_dim). Returns (out, cache): out has x's shape.
    """
    running = state.get("running_mean")
    if running is None:  # before the first training step
        running = np.zeros(x.shape[1:], dtype=x.dtype)
    if state["mode"] == "test":
        return x - running, None
    n_local = x.shape[0]
    reducer = state.get("reducer")
    if reducer is None:  # one process: its batch is the whole batch
        count, mean = n_local, x.mean(axis=0)
    else:  # one collective for the global count and sum
        sums = reducer(np.concatenate(([n_local], x.sum(axis=0).ravel())).astype(x.dtype))
        count, mean = sums[0], sums[1:].reshape(x.shape[1:]) / sums[0]
    momentum = state["options"].get("momentum", MOMENTUM)
    state["running_mean"] = momentum * running + (1 - momentum) * mean  # a float array: saved in checkpoints
    return x - mean, (n_local, count, reducer)


def center_backward(dout, cache):
    """Backward pass of centering: dx = dout - mean(dout), the mean over the global batch. Returns (dx, {}).

    Each process's dout is the gradient of its own shard's mean loss, count / n_local times the gradient of the
    global batch's mean loss: the process's sum is brought to the global scale before the reducer adds it to the
    others', and the total back to this process's scale.
    """
    n_local, count, reducer = cache
    total = dout.sum(axis=0)
    if reducer is not None:
        total = reducer(total * (n_local / count)) * (count / n_local)
    return dout - total / count, {}
