"""dpnet-contrib: extra activations, layers with weights and update rules for dpnet, found through the ``dpnet``
entry point group.

Nothing needs to import this package: once it is installed, ``FullyConnectedNet(activation="gelu")``,
``Sequential(["prelu", {"layer": "maxout", "units": 10}])`` and ``Solver(..., update_rule="adamw")`` just work
(``python -m dpnet.plugins`` lists it as ``contrib``).
"""

__version__ = "0.1.0"
