"""Built-in update rules.

Each rule is ``rule(w, dw, config=None) -> (next_w, config)``: ``w`` and ``dw`` are arrays of one shape, ``config`` a
dict holding the hyper-parameters (defaults filled in on first use) and the rule's state between calls. Rules do not
modify ``w`` or ``dw``; the returned config is the same dict, updated (its state arrays are updated in place).

Each built-in rule also has an in-place variant, ``rule.in_place(w, dw, config=None, w_scale=1.0) -> (w, config)``,
which overwrites ``w`` itself (a writable array of dtype ``np.result_type(w, dw)``) instead of allocating ``next_w``.
The Solver uses it for the parameters it owns: nothing of a parameter's size is allocated per step, and the arrays are
updated block by block, so that a rule's several passes over a block find it in the cache. The pure rule is the
in-place variant applied to a copy of ``w``: the two agree bit for bit. ``w_scale`` multiplies ``w`` first, block by
block (the Solver's decoupled weight decay, ``1 - learning_rate * weight_decay``): bit for bit ``w *= w_scale`` followed
by the update, without a pass of its own over ``w``.

The built-in rules are elementwise (``rule.elementwise = True``): an element's update depends on that element's
values alone, so the Solver can shard their state over processes (``shard_optimizer``, see dpnet.parallel.sharded).
"""

import math

import numpy as np

BLOCK_BYTES = 1 << 17  # the in-place rules update their arrays in blocks of this size (see _blocks)


def _config(config, **defaults):
    """config (a new dict if None) with the defaults of the missing hyper-parameters filled in."""
    config = {} if config is None else config
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config


def _state(config, key, like):
    """The state array config[key], which the rules update in place: zeros shaped and typed like `like` on first use;
    a copy (once) of a given value that is not a writable array of at least like's precision."""
    value = config.get(key)
    if value is None:
        value = config[key] = np.zeros_like(like)
    elif not (isinstance(value, np.ndarray) and value.flags.writeable and value.dtype == np.result_type(value, like)):
        value = config[key] = np.array(value, dtype=np.result_type(value, like))
    return value


def _blocks(w, *arrays, w_scale=1.0):
    """(w, *arrays, scratch) in matching blocks of about BLOCK_BYTES: flat views of C-contiguous arrays of w's shape,
    and a scratch array (typed like w) for the temporaries. A rule makes several passes over its arrays; block by block,
    all but the first find the block in the cache instead of streaming every array from memory once per pass.
    Other arrays (not contiguous, or shaped otherwise) come whole, as one block. Each block of w is multiplied by
    w_scale (unless 1) before it is yielded."""
    whole = [w, *map(np.asarray, arrays)]
    if any(a.shape != w.shape or not a.flags.c_contiguous for a in whole):
        if w_scale != 1:
            w *= w_scale
        yield (*whole, np.empty_like(w))
        return
    flat = [a.reshape(-1) for a in whole]
    step = max(1, BLOCK_BYTES // w.itemsize)
    scratch = np.empty(min(step, w.size), dtype=w.dtype)
    for start in range(0, w.size, step):
        block = [a[start:start + step] for a in flat]
        if w_scale != 1:
            block[0] *= w_scale
        yield (*block, scratch[:block[0].size])


def _copy(w, dw):
    """A copy of w for a pure rule to update in place, of the dtype w - dw would have."""
    return np.array(w, dtype=np.result_type(w, dw))


def _sgd_in_place(w, dw, config=None, w_scale=1.0):
    config = _config(config, learning_rate=1e-2)
    lr = config["learning_rate"]
    for w_, dw_, s in _blocks(w, dw, w_scale=w_scale):
        w_ -= np.multiply(dw_, lr, out=s)
    return w, config


def _sgd_momentum_in_place(w, dw, config=None, w_scale=1.0):
    config = _config(config, learning_rate=1e-2, momentum=0.9)
    lr, momentum = config["learning_rate"], config["momentum"]
    for w_, dw_, v, s in _blocks(w, dw, _state(config, "velocity", w), w_scale=w_scale):
        v *= momentum
        v -= np.multiply(dw_, lr, out=s)
        w_ += v
    return w, config


def _rmsprop_in_place(w, dw, config=None, w_scale=1.0):
    config = _config(config, learning_rate=1e-2, decay_rate=0.99, epsilon=1e-8)
    lr, decay, eps = config["learning_rate"], config["decay_rate"], config["epsilon"]
    for w_, dw_, cache, s in _blocks(w, dw, _state(config, "cache", w), w_scale=w_scale):
        cache *= decay
        np.multiply(dw_, 1 - decay, out=s)
        s *= dw_
        cache += s
        np.sqrt(cache, out=s)
        s += eps
        np.divide(dw_, s, out=s)
        s *= lr
        w_ -= s
    return w, config


def _adam_in_place(w, dw, config=None, w_scale=1.0):
    config = _config(config, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, t=0)
    beta1, beta2 = config["beta1"], config["beta2"]
    config["t"] += 1
    t = config["t"]
    # lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / c1, v_hat = v / c2 is rate * m / (sqrt(v) + eps * sqrt(c2)),
    # rate = lr * sqrt(c2) / c1: the bias corrections cost two scalars, not two passes over the arrays.
    root_c2 = math.sqrt(1 - beta2**t)
    eps, rate = config["epsilon"] * root_c2, config["learning_rate"] * root_c2 / (1 - beta1**t)
    for w_, dw_, m, v, s in _blocks(w, dw, _state(config, "m", w), _state(config, "v", w), w_scale=w_scale):
        m *= beta1
        np.multiply(dw_, 1 - beta1, out=s)
        m += s
        v *= beta2
        np.multiply(dw_, 1 - beta2, out=s)
        s *= dw_
        v += s
        np.sqrt(v, out=s)
        s += eps
        np.divide(m, s, out=s)
        s *= rate
        w_ -= s
    return w, config


def sgd(w, dw, config=None):
    """Vanilla stochastic gradient descent: w - learning_rate * dw.

    config: learning_rate (1e-2).
    """
    return _sgd_in_place(_copy(w, dw), dw, config)


def sgd_momentum(w, dw, config=None):
    """SGD with momentum: v = momentum * v - learning_rate * dw; w + v.

    config: learning_rate (1e-2), momentum (0.9), velocity (state, zeros like w).
    """
    return _sgd_momentum_in_place(_copy(w, dw), dw, config)


def rmsprop(w, dw, config=None):
    """RMSProp: a moving average of squared gradients scales each step.

    cache = decay_rate * cache + (1 - decay_rate) * dw**2; w - learning_rate * dw / (sqrt(cache) + epsilon).
    config: learning_rate (1e-2), decay_rate (0.99), epsilon (1e-8), cache (state, zeros like w).
    """
    return _rmsprop_in_place(_copy(w, dw), dw, config)


def adam(w, dw, config=None):
    """Adam: bias-corrected moving averages of the gradient and its square.

    m = beta1 * m + (1 - beta1) * dw; v = beta2 * v + (1 - beta2) * dw**2;
    w - learning_rate * m_hat / (sqrt(v_hat) + epsilon) with m_hat = m / (1 - beta1**t), v_hat = v / (1 - beta2**t).
    config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8); state m, v (zeros like w) and t
    (iteration count, starting at 0 and incremented before it is used).
    """
    return _adam_in_place(_copy(w, dw), dw, config)


sgd.in_place = _sgd_in_place
sgd_momentum.in_place = _sgd_momentum_in_place
rmsprop.in_place = _rmsprop_in_place
adam.in_place = _adam_in_place
# Each element's update depends on that element alone: the rules may be applied to any slices of w and dw (with the
# same slices of their state), which is what sharding the optimizer state over processes does (dpnet.parallel.sharded).
for _rule in (sgd, sgd_momentum, rmsprop, adam):
    _rule.elementwise = True
del _rule
