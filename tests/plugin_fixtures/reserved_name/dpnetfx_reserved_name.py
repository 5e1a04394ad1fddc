"""Uses the plugin name dpnet, reserved for the built-ins."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers():
    return []
