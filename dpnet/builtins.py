"""Import path of :mod:`dpnet.plugins.builtins` (reported by ``python -m dpnet.plugins``): this name is that module."""

import sys

from .plugins import builtins

sys.modules[__name__] = builtins
