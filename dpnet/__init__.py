"""dpnet: modular NumPy neural networks, pluggy plugins and MPI data-parallel training."""

__version__ = "0.1.0"

from .plugins.registry import Layer, PluginError, UnknownNameError, hookimpl  # noqa: E402,F401
