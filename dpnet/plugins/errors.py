"""The registry's errors: a broken plugin (:class:`PluginError`) and an unknown name (:class:`UnknownNameError`)."""

import difflib

from .records import UPDATE_RULE

_PLURAL = {"activation": "activations", "normalization": "normalizations", "loss": "losses", "layer": "layers",
           "model": "models",
           UPDATE_RULE: "update rules"}


class PluginError(Exception):
    """A plugin could not be loaded or used: it failed to import, its hook raised, it returned a malformed record,
    or its names collide with another provider's. ``plugin``, ``distribution`` and ``problem`` say which and why;
    ``errors`` holds every failure when several plugins are broken."""

    def __init__(self, message, plugin=None, distribution=None, problem=None, errors=()):
        super().__init__(message)
        self.plugin, self.distribution, self.problem = plugin, distribution, problem
        self.errors = list(errors) or [self]


class UnknownNameError(ValueError):
    """No registered layer of this kind (or update rule) has this name; the message lists the available names and
    the distribution providing each. ``kind``, ``name`` and ``available`` (name -> provider) are attributes."""

    def __init__(self, kind, name, available, note=""):
        self.kind, self.name, self.available = kind, name, dict(available)
        close = difflib.get_close_matches(str(name), list(available), n=3) if isinstance(name, str) else []
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        listing = "; ".join(f"{n} from {p}" for n, p in sorted(available.items())) or "none"
        super().__init__(f"unknown {kind.replace('_', ' ')} {name!r}{hint} Available {_PLURAL[kind]}: {listing}. "
                         f"{note}Plugins add more: `python -m dpnet.plugins` lists them, docs/plugins.md explains.")
