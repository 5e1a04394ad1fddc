"""dpnet: modular NumPy neural networks, pluggy plugins and MPI data-parallel training."""

__version__ = "0.1.0"

from .plugins.registry import Layer, PluginError, UnknownNameError, hookimpl  # noqa: E402,F401


def __getattr__(name):
    """`dpnet.load_model` (dpnet.loading), imported on first use so that `import dpnet` stays light (PEP 562)."""
    if name == "load_model":
        from .loading import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
