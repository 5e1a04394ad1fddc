"""dpnet_layers returns a dict instead of a list."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers():
    return {"fx_oops": None}
