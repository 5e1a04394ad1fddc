"""Plugin name fxsamename (so does dpnetfx-same-name-a)."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return []
