"""dpnet.heap: glibc's mmap threshold fixed, so that freed arrays go back to the system."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dpnet import heap

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# How many bytes of a 1 MiB array, allocated after a 25 MiB one was freed, glibc serves with a mapping of its own.
PROBE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from dpnet.heap import return_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    if sys.argv[1] == "fixed":
        assert return_freed_memory()
    big = np.ones(25 * 2**20 // 8)
    del big  # glibc's dynamic threshold rises to 25 MiB, unless it is fixed
    before = libc.mallinfo2().hblkhd
    small = np.ones(2**20 // 8)
    print(libc.mallinfo2().hblkhd - before)
""")


def _mapped_bytes(mode):
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@needs_glibc
def test_a_fixed_threshold_maps_arrays_that_glibc_would_keep_in_its_heap():
    assert _mapped_bytes("default") == 0  # glibc alone: the 1 MiB array comes from the heap
    assert _mapped_bytes("fixed") >= 2**20  # fixed at 128 KiB: its own mapping, unmapped when freed


def test_the_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.user_set_threshold() and heap.return_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert heap.return_freed_memory() is False


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "128"])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="positive number of bytes"):
        heap.return_freed_memory(bad)
