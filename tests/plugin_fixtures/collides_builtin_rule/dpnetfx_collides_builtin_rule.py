"""Provides an update rule named adam, as dpnet does."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_update_rules():
    return {"adam": lambda w, dw, config=None: (w - 1e-3 * dw, config or {})}
