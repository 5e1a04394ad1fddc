"""An update rule without a config."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_update_rules():
    def step(w, dw):
        return w - 0.01 * dw

    return {"fx_step": step}
