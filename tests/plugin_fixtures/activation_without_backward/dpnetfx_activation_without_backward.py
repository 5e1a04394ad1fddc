"""An activation without backward."""

from dpnet.registry import Layer, hookimpl


@hookimpl
def dpnet_layers():
    return [Layer("fx_nobackward", "activation", lambda x: (x, None), None)]
