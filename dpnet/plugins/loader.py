"""Loading plugins into one ``pluggy.PluginManager``: dpnet's built-ins, then the entry points of the group ``dpnet``.

Each plugin's hooks are called on their own and what they return is validated before any of it is merged, so that
a failure names its plugin and distribution and leaves the others' records intact. A plugin's import and hooks are
contained whatever they raise short of KeyboardInterrupt (SystemExit included: a plugin that calls sys.exit or
argparse cannot end the command), and what they print meanwhile goes to stderr, or into the error's message.
:func:`build` does one full load; ``dpnet.plugins.registry`` keeps its result and answers lookups from it.
"""

import contextlib
import importlib.metadata
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .records import KINDS, UPDATE_RULE, VALID_NAME, Layer, layer_problem, signature_problem

#: The kind of the ``dpnet_models`` hook's records (``available(MODEL)``).
MODEL = "model"

ENTRY_POINT_GROUP = "dpnet"
#: Plugin name of dpnet's built-ins; reserved, and never disabled.
BUILTIN_PLUGIN = "dpnet"
#: Import path reported for the built-ins (``module`` in ``python -m dpnet.plugins --json``); it names
#: ``dpnet.plugins.builtins``.
BUILTIN_MODULE = "dpnet.builtins"
DISABLE_ENV = "DPNET_DISABLE_PLUGINS"
NO_AUTOLOAD_ENV = "DPNET_DISABLE_PLUGIN_AUTOLOAD"


@dataclass
class PluginInfo:
    """One plugin as the registry saw it (``list_plugins()``, ``python -m dpnet.plugins``).

    status: ``"loaded"``, ``"disabled"`` (by the environment; ``reason`` says how) or ``"error"`` (``reason`` holds
    the message). layers maps kind -> names; update_rules and models are lists of names (all empty unless loaded).
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
    models: list = field(default_factory=list)

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
                "update_rules": list(self.update_rules), "models": list(self.models)}


def env_flag(name):
    """Whether the environment variable ``name`` is set to something other than empty, 0, false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


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


class _Contained:
    """Run plugin code: `call()` returns (result, None) or (None, the BaseException it raised, KeyboardInterrupt
    excepted, with what it printed in its text). What it prints goes to stderr when it succeeds (never to stdout,
    which `python -m dpnet.plugins --json` owns)."""

    @staticmethod
    def call(function):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                result = function()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: B036 (SystemExit too: a plugin must not end the command)
            text = " ".join(printed.getvalue().split())
            shown = f" (it printed: {text[:300]}{'...' if len(text) > 300 else ''})" if text else ""
            return None, exc, f"{_exc_text(exc)}{shown}"
        if printed.getvalue():
            sys.stderr.write(printed.getvalue())
        return result, None, ""


def _normalize(dist_name):
    return re.sub(r"[-_.]+", "-", dist_name).lower()


class RegistryState:
    """Everything the registry knows after loading: the manager, the lookup tables and the plugin records."""

    def __init__(self):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.layers = {kind: {} for kind in KINDS}  # kind -> name -> Layer (the fast path)
        self.rules = {}  # name -> rule
        self.models = {}  # name -> model factory
        self.providers = {kind: {} for kind in (*KINDS, UPDATE_RULE, MODEL)}  # kind -> name -> PluginInfo
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
            result, exc, text = _Contained.call(impl.function)
            if exc is not None:
                raise _plugin_error(info, f"raised in its {hookname} hook: {text}", exc) from exc
            results.append(result)
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
                problem = layer_problem(item)
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
                if not isinstance(name, str) or not VALID_NAME.match(name):
                    raise _plugin_error(info, f"returned a malformed record from dpnet_update_rules: {name!r} is "
                                              f"not a valid update rule name")
                problem = signature_problem(rule, ("w", "dw", "None"), "rule", keyword="config")
                if problem:
                    raise _plugin_error(info, f"returned a malformed record from dpnet_update_rules: update rule "
                                              f"{name!r}: {problem}")
                self._check_free(info, UPDATE_RULE, name, {UPDATE_RULE: rules})
                rules[name] = rule
        models = {}
        for result in self._call(plugin, "dpnet_models", info):
            if not isinstance(result, dict):
                raise _plugin_error(info, f"returned a malformed record from dpnet_models: expected a dict "
                                          f"{{name: factory}}, got {type(result).__name__} {result!r:.80}")
            for name, factory in result.items():
                if not isinstance(name, str) or not VALID_NAME.match(name):
                    raise _plugin_error(info, f"returned a malformed record from dpnet_models: {name!r} is not a "
                                              f"valid model name (a letter, then letters, digits, '_', '-' or '.')")
                if not callable(factory):
                    raise _plugin_error(info, f"returned a malformed record from dpnet_models: model {name!r}: the "
                                              f"factory is not callable (got {type(factory).__name__})")
                self._check_free(info, MODEL, name, {MODEL: models})
                models[name] = factory
        for kind, table in layers.items():
            self.layers[kind].update(table)
            self.providers[kind].update(dict.fromkeys(table, info))
            info.layers[kind] = sorted(table)
        self.rules.update(rules)
        self.providers[UPDATE_RULE].update(dict.fromkeys(rules, info))
        info.update_rules = sorted(rules)
        self.models.update(models)
        self.providers[MODEL].update(dict.fromkeys(models, info))
        info.models = sorted(models)

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
                                              f"dpnet_layers, dpnet_update_rules and dpnet_models)")
            self._collect(plugin, info)
        except PluginError as err:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, err)

    def _fail(self, info, err):
        info.status, info.reason = "error", str(err)
        info.layers, info.update_rules, info.models = {kind: [] for kind in KINDS}, [], []
        self.errors.append(err)

    def load_entry_points(self):
        """Load the entry points of the group ``dpnet``, honouring DPNET_DISABLE_PLUGINS and
        DPNET_DISABLE_PLUGIN_AUTOLOAD."""
        disabled = {entry.strip() for entry in os.environ.get(DISABLE_ENV, "").split(",") if entry.strip()}
        if BUILTIN_PLUGIN in disabled:
            warnings.warn(f"{DISABLE_ENV} lists {BUILTIN_PLUGIN!r}: dpnet's built-ins cannot be disabled",
                          stacklevel=4)
        disabled_dists = {_normalize(entry) for entry in disabled}
        self.autoload = not env_flag(NO_AUTOLOAD_ENV)
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
        plugin, exc, text = _Contained.call(ep.load)
        if exc is not None:
            self.plugins.append(info)
            self._fail(info, _plugin_error(info, f"failed to import: {text}", exc))
            return
        self.add(plugin, info)

    def failure(self):
        """One PluginError for everything that went wrong."""
        if len(self.errors) == 1:
            return self.errors[0]
        lines = "\n".join(f"- {err}" for err in self.errors)
        return PluginError(f"{len(self.errors)} plugins failed to load:\n{lines}", errors=self.errors)

    def disabled_note(self):
        """Why names may be missing (plugins disabled or not loaded), for UnknownNameError's message."""
        if not self.autoload:
            return f"(Plugins are not loaded: {NO_AUTOLOAD_ENV} is set.) "
        off = [info for info in self.plugins if info.status == "disabled"]
        if off:
            return f"(Disabled by {DISABLE_ENV}: {', '.join(i.describe() for i in off)}.) "
        return ""


def build():
    """A fresh RegistryState: the built-ins, then the entry points (reading the environment now). A broken plugin is
    recorded in ``errors``; a broken built-in raises PluginError."""
    from .. import __version__
    from . import builtins  # imported on first use, with the layers and rules it registers

    state = RegistryState()
    state.add(builtins, PluginInfo(BUILTIN_PLUGIN, "dpnet", __version__, BUILTIN_MODULE, builtin=True))
    if state.errors:  # a bug in dpnet itself: never hide it
        raise state.failure()
    state.load_entry_points()
    return state
