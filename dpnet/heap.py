"""Freed arrays go back to the system: glibc's mmap threshold, fixed once per process.

glibc's malloc serves an allocation of at least M_MMAP_THRESHOLD bytes (128 KiB at start) with a mapping of its own,
which `free` unmaps. The threshold is dynamic, though: when such a block is freed, glibc raises the threshold to its
size (up to 32 MiB), so that later arrays of that size come from the heap instead, and the heap keeps what is freed
in it for reuse. A trainer frees large arrays early on (the float64 draws behind float32 initial weights, the model's
own parameters once they move into shared memory), so afterwards every minibatch, activation and temporary came from
the heap, and each process of a 4-process job held 12 to 37 MB of freed memory it never reused
(`python -m dpnet.bench --sections memory`).

Setting the threshold with `mallopt` turns the dynamic adjustment off. The training step allocates few large arrays
(its gradients and the optimizer's scratch are reused), and fixing the threshold at 128 KiB measured no difference in
step time (`benchmarks/bench_malloc.py`). `python -m dpnet.train` calls `return_freed_memory()` first thing; library
users may call it too. It is a no-op without glibc, and when the user set the threshold already
(MALLOC_MMAP_THRESHOLD_, or glibc.malloc.mmap_threshold in GLIBC_TUNABLES).
"""

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024  # glibc's own starting value


def user_set_threshold(environ=os.environ):
    """True when the environment already sets glibc's mmap threshold (which this module then leaves alone)."""
    return "MALLOC_MMAP_THRESHOLD_" in environ or "glibc.malloc.mmap_threshold" in environ.get("GLIBC_TUNABLES", "")


def libc_mallopt_threshold(threshold):
    """Set glibc's mmap threshold to `threshold` bytes (at most 32 MiB), whatever the environment says; True on
    success, False without glibc or when glibc refuses the value."""
    _check(threshold)
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def return_freed_memory(threshold=DEFAULT_THRESHOLD):
    """Fix glibc's mmap threshold at `threshold` bytes, so that every freed array of that size or more is returned to
    the system. Returns True when the threshold was set; False without glibc, or when the environment sets it."""
    _check(threshold)
    if user_set_threshold():
        return False
    return libc_mallopt_threshold(threshold)


def _check(threshold):
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
        raise ValueError(f"the mmap threshold must be a positive number of bytes, not {threshold!r}")
