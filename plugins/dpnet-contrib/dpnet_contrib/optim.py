"""Update rules: ``rule(w, dw, config=None) -> (next_w, config)``.

As dpnet's own rules, they do not modify ``w`` or ``dw``; ``config`` holds the hyper-parameters (defaults filled in
on first use) and all of the rule's state (NumPy arrays and scalars, so that checkpoints can save it).
"""

import numpy as np


def _state(config, key, like):
    """The array config[key], created as zeros shaped and typed like `like` on first use."""
    value = config.get(key)
    if value is None:
        value = config[key] = np.zeros_like(like)
    return value


def nesterov(w, dw, config=None):
    """SGD with Nesterov momentum, in the form that keeps w at the "looked-ahead" point:
    v_next = momentum * v - learning_rate * dw;  w_next = w - momentum * v + (1 + momentum) * v_next.

    config: learning_rate (1e-2), momentum (0.9), velocity (state, zeros like w).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    mu = config["momentum"]
    v = _state(config, "velocity", w)
    v_next = mu * v - config["learning_rate"] * dw
    config["velocity"] = v_next
    return w - mu * v + (1 + mu) * v_next, config


def adagrad(w, dw, config=None):
    """Adagrad: each coordinate's step is scaled by the root of its accumulated squared gradients.
    cache += dw^2;  w_next = w - learning_rate * dw / (sqrt(cache) + epsilon).

    config: learning_rate (1e-2), epsilon (1e-8), cache (state, zeros like w).
    """
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("epsilon", 1e-8)
    cache = _state(config, "cache", w) + dw * dw
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (np.sqrt(cache) + config["epsilon"]), config


def _adamw_step_config(config):
    """(config, beta1, beta2, t) for one adamw step: config (a new dict if None) with the defaults filled in and its
    step count t advanced."""
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("weight_decay", 1e-2)
    config.setdefault("t", 0)
    config["t"] += 1
    return config, config["beta1"], config["beta2"], config["t"]


def adamw(w, dw, config=None):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay,
    w_next = w - learning_rate * (m_hat / (sqrt(v_hat) + epsilon) + weight_decay * w).
    The decay is applied to w directly, not added to the gradient, so Adam's scaling does not weaken it.

    It decays every parameter it is given, biases and batchnorm's gamma/beta included. The Solver gives every
    parameter its own copy of optim_config; to spare biases, set weight_decay=0 in theirs after constructing it:
    ``for name in solver.optim_configs: if name[0] == "b": solver.optim_configs[name]["weight_decay"] = 0.0``.

    config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8), weight_decay (1e-2); state m, v (zeros
    like w) and t (step count).
    """
    config, beta1, beta2, t = _adamw_step_config(config)
    m = beta1 * _state(config, "m", w) + (1 - beta1) * dw
    v = beta2 * _state(config, "v", w) + (1 - beta2) * dw * dw
    config["m"], config["v"] = m, v
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    step = m_hat / (np.sqrt(v_hat) + config["epsilon"]) + config["weight_decay"] * w
    return w - config["learning_rate"] * step, config


# In-place variants (``rule.in_place(w, dw, config) -> (w, config)``): they overwrite w and update the state arrays
# in place, with the pure rules' operations in the same order, so both give the same values. dpnet's Solver uses them
# for the parameters it owns, and, since each element's update depends on that element alone (``elementwise``), it
# can shard their state over the processes of a data-parallel run.
def _nesterov_in_place(w, dw, config=None):
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    mu = config["momentum"]
    v = _state(config, "velocity", w)
    w -= mu * v
    v *= mu
    v -= config["learning_rate"] * dw
    w += (1 + mu) * v
    return w, config


def _adagrad_in_place(w, dw, config=None):
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("epsilon", 1e-8)
    cache = _state(config, "cache", w)
    cache += dw * dw
    denominator = np.sqrt(cache)
    denominator += config["epsilon"]
    step = config["learning_rate"] * dw
    step /= denominator
    w -= step
    return w, config


def _adamw_in_place(w, dw, config=None):
    config, beta1, beta2, t = _adamw_step_config(config)
    m, v = _state(config, "m", w), _state(config, "v", w)
    m *= beta1
    m += (1 - beta1) * dw
    v *= beta2
    v += (1 - beta2) * dw * dw
    step = m / (1 - beta1**t)
    denominator = np.sqrt(v / (1 - beta2**t))
    denominator += config["epsilon"]
    step /= denominator
    step += config["weight_decay"] * w
    step *= config["learning_rate"]
    w -= step
    return w, config


for _rule, _in_place in ((nesterov, _nesterov_in_place), (adagrad, _adagrad_in_place), (adamw, _adamw_in_place)):
    _rule.in_place = _in_place
    _rule.elementwise = True
del _rule, _in_place
