"""A well-formed plugin whose update rule is not elementwise: momentum of the gradient scaled down to norm <= 1, the
norm being the whole parameter's. Sharded, each process would scale by its block's norm instead: the command line
must keep this rule's state whole on every process (replicated)."""

import numpy as np

from dpnet.registry import hookimpl


def clipped_momentum(w, dw, config=None):
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    velocity = config.get("velocity", np.zeros_like(w))
    velocity = config["momentum"] * velocity + dw / max(1.0, float(np.linalg.norm(dw)))
    config["velocity"] = velocity
    return w - config["learning_rate"] * velocity, config


@hookimpl
def dpnet_update_rules():
    return {"fx_clipped_momentum": clipped_momentum}
