"""Provides the activation fx_twin (so does dpnetfx-twin-a)."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return [Layer("fx_twin", "activation", lambda x: (2 * x, None), lambda dout, cache: 2 * dout)]
