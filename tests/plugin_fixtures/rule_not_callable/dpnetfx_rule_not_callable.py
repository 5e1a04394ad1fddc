"""An update rule that is not callable."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_update_rules():
    return {"fx_rule": 0.01}
