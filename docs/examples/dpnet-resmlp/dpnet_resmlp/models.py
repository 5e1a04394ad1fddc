"""A named architecture, the residual MLP: what `--model resmlp` builds."""

import numpy as np

from dpnet.models import Sequential


def resmlp(width=256, blocks=2, expansion=2, num_classes=10, input_dim=(3, 32, 32), loss="softmax", reg=0.0,
           dtype=np.float32, seed=None, label_smoothing=0.0):
    """A residual MLP: an affine layer to `width` units, PReLU, batch centering, `blocks` residual blocks of
    `expansion` * `width` hidden units, a layer normalization and an affine layer to the `num_classes` scores.

    The keywords from input_dim on are Sequential's: the command line passes those of its configuration.
    Returns the dpnet.models.Sequential.
    """
    layers = [{"layer": "affine", "units": width}, "resmlp_prelu", "resmlp_center"]
    layers += [{"layer": "resmlp_block", "expansion": expansion} for _ in range(blocks)]
    layers += ["layernorm", {"layer": "affine", "units": num_classes}]
    return Sequential(layers, input_dim=input_dim, loss=loss, reg=reg, dtype=dtype, seed=seed,
                      label_smoothing=label_smoothing)
