"""Fails to import, as a plugin with a missing dependency does."""

from dpnet.registry import hookimpl

import dpnetfx_this_dependency_is_not_installed  # noqa: F401


@hookimpl
def dpnet_layers():
    return []
