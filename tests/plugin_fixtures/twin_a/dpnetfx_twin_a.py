"""Provides the activation fx_twin (so does dpnetfx-twin-b)."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return [Layer("fx_twin", "activation", lambda x: (x, None), lambda dout, cache: dout)]
