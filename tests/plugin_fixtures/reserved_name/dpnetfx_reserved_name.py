"""Uses the plugin name dpnet, reserved for the built-ins."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return []
