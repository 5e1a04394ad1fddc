"""An exclusive inter-process lock on a folder, so that processes building the same files take turns."""

import contextlib
import os

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process locks (writes stay atomic)
    fcntl = None


@contextlib.contextmanager
def dir_lock(folder):
    """Hold an exclusive lock on folder while inside (best effort: no lock where unsupported or unopenable).

    Used for the image cache and for a download's destination folder.
    """
    fd = None
    try:
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock
