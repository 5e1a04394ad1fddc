"""Layers as pairs of pure functions.

Every ``X_forward(inputs, params...)`` returns ``(out, cache)`` and every ``X_backward(dout, cache)`` returns the
gradients with respect to the forward's array inputs, in the same order. Loss layers return ``(loss, dx)`` directly.
Nothing here knows about models, solvers, plugins or MPI.
"""

import numpy as np

_MODES = ("train", "test")


def _check_mode(param, name):
    mode = param.get("mode", "train")
    if mode not in _MODES:
        raise ValueError(f"invalid {name}['mode'] {mode!r}: expected 'train' or 'test'")
    return mode


def affine_forward(x, w, b):
    """Fully-connected layer: out = x.reshape(N, D) @ w + b.

    Inputs:
    - x: (N, d_1, ..., d_k) with D = d_1 * ... * d_k
    - w: (D, M)
    - b: (M,)

    Returns (out, cache): out is (N, M); cache is (x, w).
    """
    x2d = x.reshape(x.shape[0], -1)
    if x2d.shape[1] != w.shape[0]:
        raise ValueError(f"affine_forward: x has {x2d.shape[1]} features per sample but w has shape {w.shape}")
    out = x2d @ w
    out += b
    return out, (x, w)


def affine_backward(dout, cache, need_dx=True, dw_out=None, db_out=None):
    """Backward pass of the affine layer.

    Inputs:
    - dout: (N, M) upstream gradient
    - cache: (x, w) from affine_forward
    - need_dx: False skips the input gradient (a network's first layer has no use for it), returning None for dx
    - dw_out, db_out: None, or arrays of shapes (D, M), (M,) that receive dw and db (no allocation)

    Returns (dx, dw, db) of shapes x.shape, (D, M), (M,); dw is dw_out and db is db_out when given.
    """
    x, w = cache
    dw = np.matmul(x.reshape(x.shape[0], -1).T, dout, out=dw_out)
    dx = (dout @ w.T).reshape(x.shape) if need_dx else None
    db = np.sum(dout, axis=0, out=db_out)
    return dx, dw, db


def relu_forward(x, overwrite_x=False):
    """Rectified linear unit, elementwise max(0, x). Returns (out, cache) with out of x's shape; cache is out.

    overwrite_x=True computes out in x's memory (for a caller that owns x and no longer needs it).
    """
    out = np.maximum(x, 0, out=x if overwrite_x else None)
    return out, out


def relu_backward(dout, cache):
    """Backward pass of ReLU: dout where the input was positive, else 0. Returns dx of x's shape.

    cache is relu_forward's output: it is positive exactly where the input was.
    """
    out = cache
    return dout * (out > 0)  # a multiplication by the mask: faster than np.where


def _global_sum(local_sum, n_local, count, reducer):
    """Sum per-feature partial sums over all processes, in this process's gradient scale.

    Each process's upstream gradient is of its *local mean* loss, so per sample it is count / n_local times the
    gradient of the global mean loss. Partial sums are scaled into the global scale, summed over processes, and
    scaled back.
    """
    if reducer is None:
        return local_sum
    return reducer(local_sum * (n_local / count)) * (count / n_local)


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization over the batch axis.

    Training mode normalizes with the minibatch mean and (biased) variance and updates the running averages
    ``running = momentum * running + (1 - momentum) * batch_stat``; test mode normalizes with the running averages.

    Inputs:
    - x: (N, D)
    - gamma, beta: (D,) scale and shift
    - bn_param: dict with 'mode' ('train' or 'test'), optional 'eps' (1e-5), 'momentum' (0.9), 'running_mean' and
      'running_var' of shape (D,) (created as zeros and ones when missing, and updated in place in the dict), and
      optional 'reducer': a callable returning the sum of an array over all processes. With a reducer the batch
      statistics are those of the global batch (synchronized batchnorm).

    Returns (out, cache): out is (N, D).
    """
    mode = _check_mode(bn_param, "bn_param")
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    n_local, D = x.shape
    running_mean = bn_param.get("running_mean")
    if running_mean is None:
        running_mean = np.zeros(D, dtype=x.dtype)
    running_var = bn_param.get("running_var")
    if running_var is None:
        running_var = np.ones(D, dtype=x.dtype)

    if mode == "test":
        std = np.sqrt(running_var + eps)
        out = (x - running_mean) / std * gamma + beta
        bn_param["running_mean"], bn_param["running_var"] = running_mean, running_var
        return out, None

    reducer = bn_param.get("reducer")
    if reducer is None:
        count = n_local
        mean = x.mean(axis=0)
        xc = x - mean
        var = np.einsum("ij,ij->j", xc, xc) / count
    else:
        stats = reducer(np.concatenate(([n_local], x.sum(axis=0))).astype(x.dtype))
        count = stats[0]
        mean = stats[1:] / count
        xc = x - mean
        var = reducer(np.einsum("ij,ij->j", xc, xc)) / count
    std = np.sqrt(var + eps)
    xhat = xc
    xhat /= std  # in place: xc is ours, and no longer needed
    out = xhat * gamma
    out += beta

    bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean
    bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
    cache = (xhat, gamma, std, n_local, count, reducer)
    return out, cache


def batchnorm_backward(dout, cache):
    """Backward pass of batch normalization, node by node through the computational graph.

    Graph: mean = sum(x)/N; xc = x - mean; var = sum(xc**2)/N; std = sqrt(var + eps); xhat = xc/std;
    out = gamma*xhat + beta. Sums over the batch are global when the forward pass had a reducer.

    Inputs: dout (N, D), cache from batchnorm_forward (training mode).
    Returns (dx, dgamma, dbeta): (N, D), (D,), (D,); dgamma and dbeta are this process's partial sums.
    """
    xhat, gamma, std, n_local, count, reducer = cache
    xc = xhat * std
    dbeta = dout.sum(axis=0)
    dgamma = np.einsum("ij,ij->j", dout, xhat)
    dxhat = dout * gamma
    dxc = dxhat / std  # through xhat = xc / std
    dstd = -_global_sum(np.einsum("ij,ij->j", dxhat, xc), n_local, count, reducer) / std**2
    dvar = 0.5 * dstd / std  # through std = sqrt(var + eps)
    dxc += 2 * xc * (dvar / count)  # through var = sum(xc**2) / N
    dmean = -_global_sum(dxc.sum(axis=0), n_local, count, reducer)  # through xc = x - mean
    dx = dxc + dmean / count  # through mean = sum(x) / N
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout, cache):
    """Backward pass of batch normalization in closed form (same cache, same results as batchnorm_backward).

    dx = gamma / std * (dout - mean(dout) - xhat * mean(dout * xhat)), with means over the (global) batch; the two
    means are the bias and scale gradients divided by N, so they cost no extra pass (and one reduction, not two).

    Returns (dx, dgamma, dbeta): (N, D), (D,), (D,).
    """
    xhat, gamma, std, n_local, count, reducer = cache
    dbeta = dout.sum(axis=0)
    dgamma = np.einsum("ij,ij->j", dout, xhat)
    if reducer is None:
        sum_dbeta, sum_dgamma = dbeta, dgamma
    else:
        sums = _global_sum(np.concatenate((dbeta, dgamma)), n_local, count, reducer)
        sum_dbeta, sum_dgamma = sums[: dbeta.size], sums[dbeta.size :]
    dx = dout - sum_dbeta / count
    dx -= xhat * (sum_dgamma / count)
    dx *= gamma / std
    return dx, dgamma, dbeta


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer normalization: each sample normalized over its own features; identical in train and test mode.

    Inputs:
    - x: (N, D)
    - gamma, beta: (D,)
    - ln_param: dict with optional 'eps' (1e-5) and 'mode' (accepted for symmetry with batchnorm)

    Returns (out, cache): out is (N, D).
    """
    _check_mode(ln_param, "ln_param")
    eps = ln_param.get("eps", 1e-5)
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    std = np.sqrt(np.einsum("ij,ij->i", xc, xc)[:, None] / x.shape[1] + eps)
    xhat = xc / std
    return xhat * gamma + beta, (xhat, gamma, std)


def layernorm_backward(dout, cache):
    """Backward pass of layer normalization. Inputs dout (N, D) and the cache; returns (dx, dgamma, dbeta)."""
    xhat, gamma, std = cache
    D = xhat.shape[1]
    dbeta = dout.sum(axis=0)
    dgamma = np.einsum("ij,ij->j", dout, xhat)
    dxhat = dout * gamma
    mean_dxhat = dxhat.sum(axis=1, keepdims=True) / D
    mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xhat)[:, None] / D
    dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) / std
    return dx, dgamma, dbeta


def dropout_forward(x, dropout_param):
    """Inverted dropout: keep each unit with probability p and scale the kept ones by 1/p.

    Inputs:
    - x: any shape
    - dropout_param: dict with 'p' (probability of KEEPING a unit, 0 < p <= 1), 'mode' ('train' or 'test'), and
      optional 'rng' (a numpy Generator the masks are drawn from: reproducible training; the Solver sets it) or
      else 'seed' (the same seed gives the same mask every call: for gradient checks); without either, NumPy's
      global RNG

    Returns (out, cache): out has x's shape; in test mode out is x itself.
    """
    p = dropout_param["p"]
    if not 0 < p <= 1:
        raise ValueError(f"dropout_param['p'] is the keep probability and must be in (0, 1], got {p!r}")
    mode = _check_mode(dropout_param, "dropout_param")
    if mode == "test":
        return x, (dropout_param, None)
    seed = dropout_param.get("seed")
    # Uniforms in the input's precision: a float32 model draws float32 ones, a quarter faster than float64.
    precision = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    if dropout_param.get("rng") is not None:
        uniform = dropout_param["rng"].random(x.shape, dtype=precision)
    elif seed is not None:
        uniform = np.random.default_rng(seed).random(x.shape, dtype=precision)
    else:
        uniform = np.random.random_sample(x.shape)
    mask = (uniform < p) * (x.dtype.type(1) / x.dtype.type(p))  # 0 or 1/p, in x's dtype
    return x * mask, (dropout_param, mask)


def dropout_backward(dout, cache):
    """Backward pass of inverted dropout. Returns dx of dout's shape."""
    dropout_param, mask = cache
    if mask is None:
        return dout
    return dout * mask


def _check_labels(x, y, name):
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}: y has shape {y.shape}, expected ({x.shape[0]},) to match the scores {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: y must hold integer class labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= x.shape[1]):
        raise ValueError(f"{name}: labels must be in [0, {x.shape[1]}), got range [{y.min()}, {y.max()}]")
    return y


def _check_targets(x, t, name):
    """Soft targets t (N, C) for the scores x (N, C): finite, non-negative floats whose rows sum to 1 (to the square
    root of their dtype's precision); returned in x's dtype."""
    t = np.asarray(t)
    if t.shape != x.shape:
        raise ValueError(f"{name}: target distributions y have shape {t.shape}, expected {x.shape} like the scores")
    if t.dtype.kind != "f":
        raise ValueError(f"{name}: target distributions y must be floating point, got dtype {t.dtype}")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name}: target distributions y must be finite and non-negative")
    if t.size and np.abs(t.sum(axis=1) - 1).max() > np.sqrt(np.finfo(t.dtype).eps):
        raise ValueError(f"{name}: each row of the target distributions y must sum to 1, got sums in "
                         f"[{t.sum(axis=1).min()}, {t.sum(axis=1).max()}]")
    return t.astype(x.dtype, copy=False)


def softmax_loss(x, y, smoothing=0.0):
    """Softmax (cross-entropy) loss, averaged over the batch; stable for large scores.

    Inputs: x (N, C) scores; y either (N,) integer labels with 0 <= y[i] < C, or (N, C) target distributions t
    (soft targets, such as dpnet.mixing makes: non-negative rows summing to 1); smoothing: label smoothing eps in
    [0, 1), the target becoming (1 - eps) t + eps / C (for labels: 1 - eps on the true class plus eps / C on every
    class).
    Returns (loss, dx): the scalar -sum(t * log softmax(x)) / N and its gradient (softmax(x) - t) / N, (N, C).
    """
    soft = np.ndim(y) == 2
    y = _check_targets(x, y, "softmax_loss") if soft else _check_labels(x, y, "softmax_loss")
    if not 0 <= smoothing < 1:
        raise ValueError(f"softmax_loss: smoothing must be in [0, 1), got {smoothing!r}")
    N, C = x.shape
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(N)
    dx = np.exp(log_probs)
    if soft:
        targets = (1 - smoothing) * y + smoothing / C if smoothing else y
        loss = -np.sum(targets * log_probs) / N
        dx -= targets
    elif smoothing:
        loss = -((1 - smoothing) * np.sum(log_probs[rows, y]) + smoothing / C * np.sum(log_probs)) / N
        dx[rows, y] -= 1 - smoothing
        dx -= smoothing / C
    else:
        loss = -np.sum(log_probs[rows, y]) / N
        dx[rows, y] -= 1
    dx /= N
    return loss, dx


softmax_loss.soft_targets = True  # it takes (N, C) target distributions as y (dpnet.mixing needs such a loss)


def svm_loss(x, y):
    """Multiclass SVM (hinge) loss with margin 1, averaged over the batch.

    Inputs: x (N, C) scores; y (N,) integer labels with 0 <= y[i] < C.
    Returns (loss, dx): a scalar and the gradient (N, C).
    """
    y = _check_labels(x, y, "svm_loss")
    N = x.shape[0]
    rows = np.arange(N)
    margins = np.maximum(0, x - x[rows, y][:, None] + 1)
    margins[rows, y] = 0
    loss = margins.sum() / N
    dx = (margins > 0).astype(x.dtype)
    dx[rows, y] -= dx.sum(axis=1)
    dx /= N
    return loss, dx
