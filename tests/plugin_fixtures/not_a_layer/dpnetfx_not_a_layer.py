"""dpnet_layers returns a tuple instead of a dpnet.Layer."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_layers():
    return [("fx_tuple", "activation", lambda x: (x, None), lambda dout, cache: dout)]
