"""A Layer that skipped the constructor's validation."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    layer = object.__new__(Layer)
    for field, value in (("name", "fx_forged"), ("kind", "activation"), ("forward", 42), ("backward", None)):
        object.__setattr__(layer, field, value)
    return [layer]
