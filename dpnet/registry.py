"""Documented import path of :mod:`dpnet.plugins.registry`: this name is that module."""

import sys

from .plugins import registry

sys.modules[__name__] = registry
