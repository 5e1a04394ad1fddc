"""Built-in update rules.

Each rule is ``rule(w, dw, config=None) -> (next_w, config)``: ``w`` and ``dw`` are arrays of one shape, ``config`` a
dict holding the hyper-parameters (defaults filled in on first use) and the rule's state between calls. Rules do not
modify ``w`` or ``dw``; the returned config is the same dict, updated.
"""

import numpy as np


def _state(config, key, like):
    """The array config[key], created as zeros shaped and typed like `like` on first use."""
    value = config.get(key)
    if value is None:
        value = config[key] = np.zeros_like(like)
    return value


def sgd(w, dw, config=None):
    """Vanilla stochastic gradient descent: w - learning_rate * dw.

    config: learning_rate (1e-2).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    # One temporary, not two, with the same rounding as w - lr * dw.
    next_w = np.multiply(dw, -config["learning_rate"], dtype=np.result_type(w, dw))
    next_w += w
    return next_w, config


def sgd_momentum(w, dw, config=None):
    """SGD with momentum: v = momentum * v - learning_rate * dw; w + v.

    config: learning_rate (1e-2), momentum (0.9), velocity (state, zeros like w).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v = config["momentum"] * _state(config, "velocity", w) - config["learning_rate"] * dw
    config["velocity"] = v
    return w + v, config


def rmsprop(w, dw, config=None):
    """RMSProp: a moving average of squared gradients scales each step.

    config: learning_rate (1e-2), decay_rate (0.99), epsilon (1e-8), cache (state, zeros like w).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    decay = config["decay_rate"]
    cache = decay * _state(config, "cache", w) + (1 - decay) * dw * dw
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (np.sqrt(cache) + config["epsilon"]), config


def adam(w, dw, config=None):
    """Adam: bias-corrected moving averages of the gradient and its square.

    config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8); state m, v (zeros like w) and t
    (iteration count, starting at 0 and incremented before it is used).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    beta1, beta2 = config["beta1"], config["beta2"]
    config["t"] += 1
    t = config["t"]
    m = beta1 * _state(config, "m", w) + (1 - beta1) * dw
    v = beta2 * _state(config, "v", w) + (1 - beta2) * dw * dw
    config["m"], config["v"] = m, v
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return w - config["learning_rate"] * m_hat / (np.sqrt(v_hat) + config["epsilon"]), config
