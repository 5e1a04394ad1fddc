"""The hook implementations dpnet calls (entry point ``dpnet: contrib = dpnet_contrib.plugin``)."""

# (``from dpnet import Layer, hookimpl`` is the same; this spelling also works with dpnet checkouts that predate it)
from dpnet.registry import Layer, hookimpl

from . import activations, layers, optim


@hookimpl
def dpnet_layers():
    return [
        Layer("leaky_relu", "activation", activations.leaky_relu_forward, activations.leaky_relu_backward),
        Layer("elu", "activation", activations.elu_forward, activations.elu_backward),
        Layer("gelu", "activation", activations.gelu_forward, activations.gelu_backward),
        Layer("tanh", "activation", activations.tanh_forward, activations.tanh_backward),
        Layer("prelu", "layer", layers.prelu_forward, layers.prelu_backward, init=layers.prelu_init),
        Layer("maxout", "layer", layers.maxout_forward, layers.maxout_backward, init=layers.maxout_init),
        Layer("residual", "layer", layers.residual_forward, layers.residual_backward, init=layers.residual_init),
        Layer("lowrank", "layer", layers.lowrank_forward, layers.lowrank_backward, init=layers.lowrank_init),
    ]


@hookimpl
def dpnet_update_rules():
    return {"nesterov": optim.nesterov, "adagrad": optim.adagrad, "adamw": optim.adamw}
