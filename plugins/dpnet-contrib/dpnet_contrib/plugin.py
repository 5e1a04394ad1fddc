"""The hook implementations dpnet calls (entry point ``dpnet: contrib = dpnet_contrib.plugin``)."""

# (``from dpnet import Layer, hookimpl`` is the same; this spelling also works with dpnet checkouts that predate it)
from dpnet.registry import Layer, hookimpl

from . import activations, optim


@hookimpl
def dpnet_layers():
    return [
        Layer("leaky_relu", "activation", activations.leaky_relu_forward, activations.leaky_relu_backward),
        Layer("elu", "activation", activations.elu_forward, activations.elu_backward),
        Layer("gelu", "activation", activations.gelu_forward, activations.gelu_backward),
        Layer("tanh", "activation", activations.tanh_forward, activations.tanh_backward),
    ]


@hookimpl
def dpnet_update_rules():
    return {"nesterov": optim.nesterov, "adagrad": optim.adagrad, "adamw": optim.adamw}
