"""Plugin name fxsamename (so does dpnetfx-same-name-b)."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers():
    return []
