"""The plugin registry: one pluggy manager that resolves layers and update rules by name.

On first use the registry creates a ``pluggy.PluginManager("dpnet")``, registers dpnet's own built-ins
(``dpnet.builtins``, plugin name ``"dpnet"``), then loads every entry point of the group ``dpnet`` from the installed
distributions, calls each plugin's hooks (see ``dpnet.hookspecs``) and validates what they return. From then on a
lookup is a dict access: resolve names once (models do it at construction) and keep the functions.

Environment (read when the registry loads; call :func:`reset` after changing it in-process):

- ``DPNET_DISABLE_PLUGINS=name1,name2``: these plugins (entry-point names, or distribution names) are blocked before
  they are imported. The built-ins cannot be disabled.
- ``DPNET_DISABLE_PLUGIN_AUTOLOAD=1``: no entry point is loaded, only the built-ins.

A plugin that fails to import, whose hook raises, that returns a malformed record, or whose names collide with
another's makes every lookup raise one :class:`PluginError` naming the plugin, its distribution and the problem;
disabling it (``DPNET_DISABLE_PLUGINS``) brings the built-ins back. ``python -m dpnet.plugins`` lists what is
installed and what is broken.
"""

import difflib
import importlib.metadata
import inspect
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import pluggy

from . import hookspecs
from .hookspecs import hookimpl  # noqa: F401  (re-exported: ``from dpnet.registry import hookimpl``)

__all__ = ["Layer", "hookimpl", "PluginError", "UnknownNameError", "PluginInfo", "KINDS", "ENTRY_POINT_GROUP",
           "get_layer", "get_update_rule", "available", "list_plugins", "get_plugin_manager", "reset"]

#: Layer kinds; ``available()`` also accepts ``"update_rule"``.
KINDS = ("activation", "normalization", "loss")
UPDATE_RULE = "update_rule"
ENTRY_POINT_GROUP = "dpnet"
BUILTIN_PLUGIN = "dpnet"
DISABLE_ENV = "DPNET_DISABLE_PLUGINS"
NO_AUTOLOAD_ENV = "DPNET_DISABLE_PLUGIN_AUTOLOAD"

_PLURAL = {"activation": "activations", "normalization": "normalizations", "loss": "losses",
           UPDATE_RULE: "update rules"}
# Positional arguments each kind's functions are called with (backward: None means "must be None").
_CALLS = {
    "activation": (("x",), ("dout", "cache")),
    "normalization": (("x", "gamma", "beta", "param"), ("dout", "cache")),
    "loss": (("scores", "y"), None),
}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


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


def _signature_problem(func, args, what, keyword=None):
    """None if func can be called with len(args) positional arguments (and the keyword argument, if any)."""
    if not callable(func):
        return f"{what} is not callable (got {type(func).__name__})"
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and extension callables have no signature: trust them
        return None
    try:
        sig.bind(*args)
        if keyword is not None:
            sig.bind(*args[:-1], **{keyword: args[-1]})
    except TypeError as exc:
        call = ", ".join(args[:-1] + (f"{keyword}={args[-1]}",) if keyword else args)
        return f"{what} must be callable as {what.split()[-1]}({call}), but its signature is {sig} ({exc})"
    return None


def _layer_problem(layer):
    """What is wrong with a Layer record, or None."""
    if not isinstance(layer.name, str) or not _NAME.match(layer.name):
        return (f"name {layer.name!r} is not a valid layer name (a letter, then letters, digits, '_', '-' or '.', "
                f"so that it can be typed on the command line)")
    if layer.kind not in KINDS:
        return f"kind {layer.kind!r} is not one of {', '.join(KINDS)}"
    forward_args, backward_args = _CALLS[layer.kind]
    problem = _signature_problem(layer.forward, forward_args, "forward")
    if problem:
        return problem
    if backward_args is None:
        if layer.backward is not None:
            return (f"a {layer.kind} layer returns its gradient from forward, so backward must be None "
                    f"(got {layer.backward!r})")
    elif layer.backward is None:
        return f"a {layer.kind} layer needs a backward function (got None)"
    else:
        return _signature_problem(layer.backward, backward_args, "backward")
    return None


@dataclass(frozen=True)
class Layer:
    """A named pair of layer functions, as returned by the ``dpnet_layers`` hook.

    - name: what users type (``activation="swish"``); a letter, then letters, digits, ``_``, ``-`` or ``.``
    - kind: ``"activation"`` | ``"normalization"`` | ``"loss"`` (see ``dpnet.hookspecs.dpnet_layers`` for the
      signatures each kind's functions must have)
    - forward, backward: the functions; ``backward`` is None for a loss

    Raises ValueError when the record is malformed (unknown kind, forward not callable, missing backward, ...).
    """

    name: str
    kind: str
    forward: Callable
    backward: Optional[Callable] = None

    def __post_init__(self):
        problem = _layer_problem(self)
        if problem:
            raise ValueError(f"invalid Layer {self.name!r}: {problem}")


@dataclass
class PluginInfo:
    """One plugin as the registry saw it (``list_plugins()``, ``python -m dpnet.plugins``).

    status: ``"loaded"``, ``"disabled"`` (by the environment; ``reason`` says how) or ``"error"`` (``reason`` holds
    the message). layers maps kind -> names; update_rules is a list of names (both empty unless loaded).
    """

    name: str
    distribution: Optional[str]
    version: Optional[str]
    module: str
    builtin: bool = False
    status: str = "loaded"
    reason: str = ""
    layers: dict = field(default_factory=lambda: {kind: [] for kind in KINDS})
    update_rules: list = field(default_factory=list)

    def dist_label(self):
        """``"dpnet-contrib 0.1.0"``: the distribution and its version."""
        return " ".join(str(part) for part in (self.distribution, self.version) if part) or "no distribution"

    def describe(self):
        """Who provides a name: ``"dpnet 0.1.0 (built-in)"``, ``"dpnet-contrib 0.1.0 (plugin 'contrib')"``."""
        return f"{self.dist_label()} (built-in)" if self.builtin else f"{self.dist_label()} (plugin {self.name!r})"

    def to_dict(self):
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "module": self.module, "builtin": self.builtin, "status": self.status, "reason": self.reason,
                "layers": {kind: list(names) for kind, names in self.layers.items()},
                "update_rules": list(self.update_rules)}


def _plugin_error(info, problem, cause=None):
    err = PluginError(f"plugin {info.name!r} (distribution {info.dist_label()}, entry point "
                      f"{ENTRY_POINT_GROUP}: {info.name} = {info.module}) {problem}. To run without it, set "
                      f"{DISABLE_ENV}={info.name if info.name != BUILTIN_PLUGIN else info.distribution} or "
                      f"uninstall {info.distribution or 'it'}.",
                      plugin=info.name, distribution=info.distribution, problem=problem)
    err.__cause__ = cause
    return err


def _exc_text(exc):
    return f"{type(exc).__name__}: {exc}"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _normalize(dist_name):
    return re.sub(r"[-_.]+", "-", dist_name).lower()


class _State:
    """Everything the registry knows after loading: the manager, the lookup tables and the plugin records."""

    def __init__(self):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.layers = {kind: {} for kind in KINDS}  # kind -> name -> Layer (the fast path)
        self.rules = {}  # name -> rule
        self.providers = {kind: {} for kind in (*KINDS, UPDATE_RULE)}  # kind -> name -> PluginInfo
        self.plugins = []  # PluginInfo, in load order, including disabled and broken ones
        self.errors = []  # PluginError
        self.autoload = True

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _call(self, plugin, hookname, info):
        """Results of one plugin's implementations of one hook (so that a failure has a name)."""
        results = []
        for impl in getattr(self.pm.hook, hookname).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if impl.hookwrapper or impl.wrapper:
                raise _plugin_error(info, f"implements {hookname} as a hook wrapper, which dpnet does not support")
            try:
                results.append(impl.function())
            except Exception as exc:
                raise _plugin_error(info, f"raised in its {hookname} hook: {_exc_text(exc)}", exc) from exc
        return results

    def _collect(self, plugin, info):
        """Validate everything the plugin provides against what is registered; merge only if all of it is sound."""
        layers, rules = {kind: {} for kind in KINDS}, {}
        for result in self._call(plugin, "dpnet_layers", info):
            if not isinstance(result, (list, tuple)):
                raise _plugin_error(info, f"returned a malformed record from dpnet_layers: expected a list of "
                                          f"dpnet.Layer, got {type(result).__name__} {result!r:.80}")
            for item in result:
                if not isinstance(item, Layer):
                    raise _plugin_error(info, f"returned a malformed record from dpnet_layers: expected a "
                                              f"dpnet.Layer, got {type(item).__name__} {item!r:.80}")
                problem = _layer_problem(item)
                if problem:
                    raise _plugin_error(info, f"returned a malformed record from dpnet_layers: layer "
                                              f"{item.name!r}: {problem}")
                self._check_free(info, item.kind, item.name, layers)
                layers[item.kind][item.name] = item
        for result in self._call(plugin, "dpnet_update_rules", info):
            if not isinstance(result, dict):
                raise _plugin_error(info, f"returned a malformed record from dpnet_update_rules: expected a dict "
                                          f"{{name: rule}}, got {type(result).__name__} {result!r:.80}")
            for name, rule in result.items():
                if not isinstance(name, str) or not _NAME.match(name):
                    raise _plugin_error(info, f"returned a malformed record from dpnet_update_rules: {name!r} is "
                                              f"not a valid update rule name")
                problem = _signature_problem(rule, ("w", "dw", "None"), "rule", keyword="config")
                if problem:
                    raise _plugin_error(info, f"returned a malformed record from dpnet_update_rules: update rule "
                                              f"{name!r}: {problem}")
                self._check_free(info, UPDATE_RULE, name, {UPDATE_RULE: rules})
                rules[name] = rule
        for kind, table in layers.items():
            self.layers[kind].update(table)
            self.providers[kind].update(dict.fromkeys(table, info))
            info.layers[kind] = sorted(table)
        self.rules.update(rules)
        self.providers[UPDATE_RULE].update(dict.fromkeys(rules, info))
        info.update_rules = sorted(rules)

    def _check_free(self, info, kind, name, own):
        what = f"{kind.replace('_', ' ')} {name!r}"
        if name in own[kind]:
            raise _plugin_error(info, f"provides {what} twice")
        other = self.providers[kind].get(name)
        if other is not None:
            whose = "a built-in" if other.builtin else f"the one from {other.describe()}"
            raise _plugin_error(info, f"provides {what}, which collides with {whose}; names must be unique "
                                      f"(a plugin cannot override another's)")

    # -- loading -------------------------------------------------------------------------------------------------
    def add(self, plugin, info):
        """Register one plugin object and collect its records; on failure record the error and unregister it."""
        self.plugins.append(info)
        try:
            try:
                self.pm.register(plugin, name=info.name)
            except Exception as exc:  # pluggy's validation (bad hook arguments), or registered twice
                raise _plugin_error(info, f"could not be registered: {_exc_text(exc)}", exc) from exc
            for caller in self.pm.get_hookcallers(plugin) or ():
                if not caller.has_spec():
                    raise _plugin_error(info, f"implements an unknown hook {caller.name!r} (dpnet's hooks are "
                                              f"dpnet_layers and dpnet_update_rules)")
            self._collect(plugin, info)
        except PluginError as err:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, err)

    def _fail(self, info, err):
        info.status, info.reason = "error", str(err)
        info.layers, info.update_rules = {kind: [] for kind in KINDS}, []
        self.errors.append(err)

    def load_entry_points(self):
        disabled = {entry.strip() for entry in os.environ.get(DISABLE_ENV, "").split(",") if entry.strip()}
        if BUILTIN_PLUGIN in disabled:
            warnings.warn(f"{DISABLE_ENV} lists {BUILTIN_PLUGIN!r}: dpnet's built-ins cannot be disabled",
                          stacklevel=4)
        disabled_dists = {_normalize(entry) for entry in disabled}
        self.autoload = not _env_flag(NO_AUTOLOAD_ENV)
        seen_dists, by_name = set(), {}
        for dist in importlib.metadata.distributions():
            dist_name = dist.name
            if not dist_name or _normalize(dist_name) in seen_dists:
                continue  # a broken dist-info, or a copy shadowed by one earlier on sys.path (as for imports)
            seen_dists.add(_normalize(dist_name))
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                info = PluginInfo(ep.name, dist_name, dist.version, ep.value)
                if not self.autoload:
                    self.plugins.append(info)
                    info.status, info.reason = "disabled", f"{NO_AUTOLOAD_ENV} is set"
                elif _normalize(dist_name) in disabled_dists or (ep.name in disabled and ep.name != BUILTIN_PLUGIN):
                    self.plugins.append(info)
                    info.status, info.reason = "disabled", f"{DISABLE_ENV} lists it"
                    if ep.name != BUILTIN_PLUGIN:
                        self.pm.set_blocked(ep.name)  # (blocking "dpnet" would unregister the built-ins)
                elif ep.name == BUILTIN_PLUGIN:
                    self.plugins.append(info)
                    self._fail(info, _plugin_error(info, f"uses the plugin name {BUILTIN_PLUGIN!r}, which is "
                                                         f"reserved for dpnet's built-ins"))
                elif ep.name in by_name:
                    self.plugins.append(info)
                    first = by_name[ep.name]
                    self._fail(info, _plugin_error(info, f"has the same plugin name as the one from "
                                                         f"{first.describe()}; plugin names must be unique"))
                else:
                    by_name[ep.name] = info
                    self._load(ep, info)

    def _load(self, ep, info):
        try:
            plugin = ep.load()
        except Exception as exc:
            self.plugins.append(info)
            self._fail(info, _plugin_error(info, f"failed to import: {_exc_text(exc)}", exc))
            return
        self.add(plugin, info)

    def failure(self):
        """One PluginError for everything that went wrong."""
        if len(self.errors) == 1:
            return self.errors[0]
        lines = "\n".join(f"- {err}" for err in self.errors)
        return PluginError(f"{len(self.errors)} plugins failed to load:\n{lines}", errors=self.errors)

    def disabled_note(self):
        if not self.autoload:
            return f"(Plugins are not loaded: {NO_AUTOLOAD_ENV} is set.) "
        off = [info for info in self.plugins if info.status == "disabled"]
        if off:
            return f"(Disabled by {DISABLE_ENV}: {', '.join(i.describe() for i in off)}.) "
        return ""


def _build():
    from . import __version__, builtins

    state = _State()
    state.add(builtins, PluginInfo(BUILTIN_PLUGIN, "dpnet", __version__, builtins.__name__, builtin=True))
    if state.errors:  # a bug in dpnet itself: never hide it
        raise state.failure()
    state.load_entry_points()
    return state


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
                state = _build()
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

    kind: ``"activation"``, ``"normalization"`` or ``"loss"``; name: a registered name (a Layer of that kind is
    returned as is). Raises UnknownNameError listing what is available, PluginError if a plugin is broken.
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


def available(kind):
    """Registered names of a kind (``"activation"``, ``"normalization"``, ``"loss"`` or ``"update_rule"``), sorted,
    each mapped to who provides it: ``{"relu": "dpnet 0.1.0 (built-in)", "gelu": "dpnet-contrib 0.1.0 (plugin
    'contrib')"}``."""
    _check_kind(kind, (*KINDS, UPDATE_RULE))
    providers = _loaded().providers[kind]
    return {name: providers[name].describe() for name in sorted(providers)}


def list_plugins():
    """Every plugin the registry saw, built-ins first: loaded, disabled and broken ones (``PluginInfo``). Unlike the
    lookups this does not raise for a broken plugin: it is how ``python -m dpnet.plugins`` reports them."""
    return list(_loaded(strict=False).plugins)
