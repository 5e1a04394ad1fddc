"""Optional packages of the tests: skipped where a developer lacks them, a failure under CI (which installs them)."""

import importlib
import os
import shutil

import pytest


def _missing(what):
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: see .ci/run)", pytrace=False)
    pytest.skip(what)


def require_module(name, install):
    """The imported module `name`; else skip locally, or fail under CI, saying `install`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"{name} is not installed ({install})")


def require_program(name, install):
    """The path of the program `name`; else skip locally, or fail under CI, saying `install`."""
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not on PATH ({install})")
    return path
