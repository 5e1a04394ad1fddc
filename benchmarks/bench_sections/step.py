"""Section `step`: dpnet's training step against its BLAS floor and against a hand-written NumPy step."""

import numpy as np

from .common import LEARNING_RATES, median_ms, synthetic_batch, timed
from .exchange_step import ExchangeStep


def dpnet_step(hidden_dims, batch_size, dtype, rule):
    """(model, step): step() is one training step of dpnet on a fixed batch, as the Solver takes it with one process
    (ExchangeStep: the loss into the exchange's gradient views, then the update, in place for the built-in rules)."""
    from dpnet.classifiers.fc_net import FullyConnectedNet

    model = FullyConnectedNet(hidden_dims, dtype=dtype, seed=0)
    X, y = synthetic_batch(batch_size, dtype)
    step = ExchangeStep(model, rule, {"learning_rate": LEARNING_RATES.get(rule, 1e-4)})
    return model, lambda: step(X, y)


def handwritten_gradients(weights, biases, X, y):
    """Gradients [(dW_L, db_L), ..., (dW_1, db_1)] (last layer first) of the mean softmax loss of an affine-ReLU MLP,
    written out in plain NumPy, nothing of dpnet's: ReLU in place, no gradient of the input X (N, D)."""
    batch_size = X.shape[0]
    activations = [X]
    for w, b in zip(weights[:-1], biases[:-1]):
        a = activations[-1] @ w
        a += b
        activations.append(np.maximum(a, 0, out=a))
    scores = activations[-1] @ weights[-1]
    scores += biases[-1]
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    scores[np.arange(batch_size), y] -= 1
    scores /= batch_size
    dout, grads = scores, []
    for i in range(len(weights) - 1, -1, -1):
        grads.append((activations[i].T @ dout, dout.sum(axis=0)))
        if i > 0:
            dout = dout @ weights[i].T
            dout *= activations[i] > 0
    return grads


def handwritten_step(model, batch_size, dtype, learning_rate=LEARNING_RATES["sgd"]):
    """The same MLP's training step with sgd in plain NumPy (handwritten_gradients, then w -= lr * dw), on its own
    copy of the model's parameters. The shortest honest program for this step: how close a library can get to the
    BLAS floor when the update is a separate pass over the parameters (it reads w and dw and writes w: memory-bound)."""
    X, y = synthetic_batch(batch_size, dtype)
    X = X.reshape(batch_size, -1)
    L = model.num_layers
    weights = [model.params[f"W{i}"].copy() for i in range(1, L + 1)]
    biases = [model.params[f"b{i}"].copy() for i in range(1, L + 1)]

    def step():
        grads = handwritten_gradients(weights, biases, X, y)
        for (dw, db), w, b in zip(grads, reversed(weights), reversed(biases)):
            w -= learning_rate * dw
            b -= learning_rate * db

    return step


def blas_products(model, batch_size, dtype):
    """The (A, B) operand pairs of every matrix product in one training step, allocated once."""
    rng = np.random.default_rng(0)
    dims = [model.input_dim] + [model.params[f"W{i}"].shape[1] for i in range(1, model.num_layers + 1)]
    pairs = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        a, w, d = (rng.standard_normal(s).astype(dtype) for s in ((batch_size, fan_in), (fan_in, fan_out),
                                                                (batch_size, fan_out)))
        pairs.append((a, w))  # forward: activations @ W
        pairs.append((a.T, d))  # backward: dW = activations.T @ dout
        if fan_in != model.input_dim:
            pairs.append((d, w.T))  # backward: dx = dout @ W.T (not for the network's input)
    return pairs


def blas_floor(pairs):
    for a, b in pairs:
        a @ b


def measure_step(hidden_dims, batch_size, dtype, rule, repeats, warmup):
    """Medians of the step and of its BLAS floor (and, with sgd, of the hand-written NumPy step), alternating in this
    process (forward and reversed order in turn)."""
    model, step = dpnet_step(hidden_dims, batch_size, dtype, rule)
    pairs = blas_products(model, batch_size, dtype)
    order = [("step", step), ("floor", lambda: blas_floor(pairs))]
    if rule == "sgd":
        order.append(("handwritten", handwritten_step(model, batch_size, dtype)))
    runs = {name: [] for name, _ in order}
    for i in range(warmup + repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds = timed(fn)
            if i >= warmup:
                runs[name].append(seconds)
    step_ms, floor_ms = median_ms(runs["step"]), median_ms(runs["floor"])
    result = dict(dtype=np.dtype(dtype).name, rule=rule, step_ms=step_ms, floor_ms=floor_ms,
                  ratio=step_ms / floor_ms, samples_per_sec=batch_size / step_ms * 1e3, step_times=runs["step"],
                  floor_times=runs["floor"])
    if "handwritten" in runs:
        result.update(handwritten_ms=median_ms(runs["handwritten"]), handwritten_times=runs["handwritten"])
        result["handwritten_ratio"] = result["handwritten_ms"] / floor_ms
    return result


def section_step(args):
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for dtype in args.dtypes:
            for rule in args.rules:
                rows.append(measure_step(args.hidden_dims, args.batch_size, dtype, rule, args.repeats, args.warmup))
    return rows
