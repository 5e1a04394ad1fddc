"""dpnet-contrib's tests need the distribution installed (its entry point is how dpnet finds it): without it they
are not collected, but under CI, which installs it, that is an error rather than a silent skip."""

import os

try:
    import dpnet_contrib  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI"):
        raise RuntimeError("dpnet-contrib is not installed: pip install -e plugins/dpnet-contrib") from None
    collect_ignore_glob = ["test_*.py"]
