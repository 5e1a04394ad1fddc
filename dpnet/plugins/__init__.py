"""dpnet's plugin machinery: pluggy hooks, the registry that resolves layers, update rules and models by name, and
checks.

- ``hookspecs``: what a plugin may provide (``dpnet_layers``, ``dpnet_update_rules``, ``dpnet_models``) and the
  ``hookimpl`` marker
- ``records``: the ``Layer`` record, its kinds and the signature checks
- ``errors``: ``PluginError``, ``UnknownNameError``
- ``loader``: loading the built-ins and the entry points of the group ``dpnet`` into one plugin manager
- ``registry``: the lookups (``get_layer``, ``get_update_rule``, ``get_model``, ``available``, ``list_plugins``,
  ``reset``)
- ``builtins``: dpnet's own layers and rules, registered through the same hooks (plugin name ``"dpnet"``)
- ``testing``, ``testing_layers``: ``check_layer``, ``check_model``, ``check_update_rule``, ``check_plugin`` for
  plugin authors
- ``cli``: ``python -m dpnet.plugins [--json]``

The documented import paths are ``dpnet.registry``, ``dpnet.hookspecs``, ``dpnet.testing`` and ``from dpnet import
Layer, hookimpl, PluginError, UnknownNameError``; each of those modules is the one here under the same name.
"""

from .cli import format_table, main  # noqa: F401  (``from dpnet import plugins; plugins.main()``)
