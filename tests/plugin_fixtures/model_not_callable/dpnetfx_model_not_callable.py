"""dpnet_models maps a name to something that is not a factory."""

from dpnet.registry import hookimpl


@hookimpl
def dpnet_models():
    return {"fx_model": "affine,relu"}
