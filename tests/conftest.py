"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar10_dir():
    """Path of the real CIFAR-10 (the cifar-10-batches-py folder or the folder holding it), from $DPNET_TEST_DATA_DIR.

    When it is unset or holds no CIFAR-10: the test is skipped locally, but fails when $CI is set (CI must run the
    real-data tests, not skip them silently).
    """
    value = os.environ.get("DPNET_TEST_DATA_DIR", "")
    path = Path(value).expanduser() if value else None
    if path is not None and any((p / "data_batch_1").is_file() for p in (path, path / "cifar-10-batches-py")):
        return path
    reason = ("DPNET_TEST_DATA_DIR is not set" if path is None
              else f"DPNET_TEST_DATA_DIR={value} holds no CIFAR-10 (no data_batch_1 in it or in its "
                   f"cifar-10-batches-py)")
    message = f"real CIFAR-10 needed: {reason}; set it to the folder of the official python batches"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
