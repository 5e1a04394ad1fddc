"""What dpnet loads through the entry point: the three layers and the model."""

from dpnet import Layer, hookimpl

from . import block, center, models, prelu


@hookimpl
def dpnet_layers():
    return [
        Layer("resmlp_prelu", "layer", prelu.prelu_forward, prelu.prelu_backward, init=prelu.prelu_init),
        Layer("resmlp_center", "layer", center.center_forward, center.center_backward, init=center.center_init),
        Layer("resmlp_block", "layer", block.block_forward, block.block_backward, init=block.block_init),
    ]


@hookimpl
def dpnet_models():
    return {"resmlp": models.resmlp}
