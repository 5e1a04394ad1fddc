"""Its dpnet_layers takes an argument the spec does not have."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers(config):
    return []
