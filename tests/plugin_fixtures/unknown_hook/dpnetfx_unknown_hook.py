"""Implements dpnet_layer (a typo of dpnet_layers)."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layer():
    return []
