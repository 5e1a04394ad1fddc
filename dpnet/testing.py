"""Documented import path of :mod:`dpnet.plugins.testing`: this name is that module."""

import sys

from .plugins import testing

sys.modules[__name__] = testing
