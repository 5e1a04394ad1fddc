"""A loss that sets backward."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return [Layer("fx_loss", "loss", lambda scores, y: (0.0, scores), lambda dout, cache: dout)]
