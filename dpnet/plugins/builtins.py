"""dpnet's own layers and update rules, registered through the same hooks as any plugin (plugin name ``"dpnet"``).

The registry registers this module first, before the entry points, so a plugin cannot shadow a built-in name: a
collision is an error that names both providers.
"""

from .. import layers, optim
from .hookspecs import hookimpl
from .records import Layer


@hookimpl
def dpnet_layers():
    """Activations relu; normalizations batchnorm, layernorm; losses softmax, svm; layers affine, dropout."""
    from .. import models  # the layers with parameters of their own, and Sequential, which uses this registry

    return [
        models.AFFINE,
        models.DROPOUT,
        Layer("relu", "activation", layers.relu_forward, layers.relu_backward),
        Layer("batchnorm", "normalization", layers.batchnorm_forward, layers.batchnorm_backward_alt),
        Layer("layernorm", "normalization", layers.layernorm_forward, layers.layernorm_backward),
        Layer("softmax", "loss", layers.softmax_loss, None),
        Layer("svm", "loss", layers.svm_loss, None),
    ]


@hookimpl
def dpnet_update_rules():
    """sgd, sgd_momentum, rmsprop, adam."""
    return {"sgd": optim.sgd, "sgd_momentum": optim.sgd_momentum, "rmsprop": optim.rmsprop, "adam": optim.adam}
