"""Its dpnet_layers hook raises."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers():
    raise RuntimeError("the layer table is corrupt")
