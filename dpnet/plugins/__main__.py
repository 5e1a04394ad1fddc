"""``python -m dpnet.plugins [--json]``: see :mod:`dpnet.plugins.cli`."""

import sys

from .cli import main

sys.exit(main())
