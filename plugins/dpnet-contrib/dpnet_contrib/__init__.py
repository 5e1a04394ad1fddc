"""dpnet-contrib: extra activations and update rules for dpnet, found through the ``dpnet`` entry point group.

Nothing needs to import this package: once it is installed, ``FullyConnectedNet(activation="gelu")`` and
``Solver(..., update_rule="adamw")`` just work (``python -m dpnet.plugins`` lists it as ``contrib``).
"""

__version__ = "0.1.0"
