"""Documented import path of :mod:`dpnet.plugins.hookspecs`: this name is that module."""

import sys

from .plugins import hookspecs

sys.modules[__name__] = hookspecs
