"""The plugin registry: one pluggy manager that resolves layers, update rules and models by name.

On first use the registry creates a ``pluggy.PluginManager("dpnet")``, registers dpnet's own built-ins
(``dpnet.plugins.builtins``, plugin name ``"dpnet"``), then loads every entry point of the group ``dpnet`` from the
installed distributions, calls each plugin's hooks (see ``dpnet.hookspecs``) and validates what they return. From
then on a lookup is a dict access: resolve names once (models do it at construction) and keep the functions.

Environment (read when the registry loads; call :func:`reset` after changing it in-process):

- ``DPNET_DISABLE_PLUGINS=name1,name2``: these plugins (entry-point names, or distribution names) are blocked before
  they are imported. The built-ins cannot be disabled.
- ``DPNET_DISABLE_PLUGIN_AUTOLOAD=1``: no entry point is loaded, only the built-ins.

A plugin that fails to import, whose hook raises, that returns a malformed record, or whose names collide with
another's makes every lookup raise one :class:`PluginError` naming the plugin, its distribution and the problem;
disabling it (``DPNET_DISABLE_PLUGINS``) brings the built-ins back. ``python -m dpnet.plugins`` lists what is
installed and what is broken.
"""

import threading

from .errors import PluginError, UnknownNameError
from .hookspecs import hookimpl
from .loader import (BUILTIN_PLUGIN, DISABLE_ENV, ENTRY_POINT_GROUP, MODEL,  # noqa: F401 (re-exported)
                     NO_AUTOLOAD_ENV, PluginInfo, build)
from .records import KINDS, UPDATE_RULE, Layer

__all__ = ["Layer", "hookimpl", "PluginError", "UnknownNameError", "PluginInfo", "KINDS", "ENTRY_POINT_GROUP",
           "get_layer", "get_update_rule", "get_model", "available", "list_plugins", "get_plugin_manager", "reset"]


_lock = threading.Lock()
_state = None  # the loaded registry, once it loaded without errors


def _loaded(strict=True):
    """The registry's state, loading it on first use. strict: raise PluginError if any plugin is broken."""
    global _state
    state = _state
    if state is None:
        with _lock:
            state = _state
            if state is None:
                state = build()
                if not state.errors:
                    _state = state
    if strict and state.errors:
        raise state.failure()
    return state


def reset():
    """Forget the loaded plugins: the next lookup builds a new manager (and re-reads the environment variables).
    For tests and sessions that install, disable or fix plugins. Models built before keep the functions they
    resolved."""
    global _state
    with _lock:
        _state = None


def get_plugin_manager():
    """The ``pluggy.PluginManager`` holding the built-ins and the loaded plugins (raises PluginError if a plugin is
    broken)."""
    return _loaded().pm


def _check_kind(kind, kinds):
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(kinds)}")


def get_layer(kind, name):
    """The Layer of this kind registered under this name.

    kind: ``"activation"``, ``"normalization"``, ``"loss"`` or ``"layer"``; name: a registered name (a Layer of that
    kind is returned as is). Raises UnknownNameError listing what is available, PluginError if a plugin is broken.
    """
    state = _state if _state is not None else _loaded()
    try:
        return state.layers[kind][name]
    except (KeyError, TypeError):
        pass
    _check_kind(kind, KINDS)
    if isinstance(name, Layer):
        if name.kind != kind:
            raise ValueError(f"layer {name.name!r} is a {name.kind} layer, not a{'n' * (kind[0] in 'aeiou')} {kind}")
        return name
    raise UnknownNameError(kind, name, available(kind), state.disabled_note())


def get_update_rule(name):
    """The update rule registered under this name (a callable is returned as is). Raises UnknownNameError listing
    what is available, PluginError if a plugin is broken."""
    state = _state if _state is not None else _loaded()
    try:
        return state.rules[name]
    except (KeyError, TypeError):
        pass
    if callable(name):
        return name
    raise UnknownNameError(UPDATE_RULE, name, available(UPDATE_RULE), state.disabled_note())


def get_model(name):
    """The model factory (``factory(**options) -> model``, from a plugin's ``dpnet_models`` hook) registered under
    this name (a callable is returned as is). Raises UnknownNameError listing what is available, PluginError if a
    plugin is broken."""
    state = _state if _state is not None else _loaded()
    try:
        return state.models[name]
    except (KeyError, TypeError):
        pass
    if callable(name):
        return name
    raise UnknownNameError(MODEL, name, available(MODEL), state.disabled_note())


def available(kind):
    """Registered names of a kind (``"activation"``, ``"normalization"``, ``"loss"``, ``"layer"``,
    ``"update_rule"`` or ``"model"``), sorted, each mapped to who provides it: ``{"relu": "dpnet 0.1.0 (built-in)",
    "gelu": "dpnet-contrib 0.1.0 (plugin 'contrib')"}``."""
    _check_kind(kind, (*KINDS, UPDATE_RULE, MODEL))
    providers = _loaded().providers[kind]
    return {name: providers[name].describe() for name in sorted(providers)}


def list_plugins():
    """Every plugin the registry saw, built-ins first: loaded, disabled and broken ones (``PluginInfo``). Unlike the
    lookups this does not raise for a broken plugin: it is how ``python -m dpnet.plugins`` reports them."""
    return list(_loaded(strict=False).plugins)
