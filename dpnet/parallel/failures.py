"""How a data-parallel job fails: as a whole, never with some processes left waiting.

`install_abort_handler(comm)` turns an unhandled exception, SIGINT or SIGTERM on any rank into one message on stderr
and `comm.abort()` of the whole job. `fault_injection_point(comm, step)` raises on the rank and step named by
$DPNET_FAULT_INJECT="rank=R,step=S" (tests only; both keys required integers, spaces allowed around them).
"""

import functools
import os
import signal
import socket
import sys
import threading
import traceback

from .environment import warn

FAULT_ENV = "DPNET_FAULT_INJECT"

_abort_handler_installed = False
_signal_sockets = None  # kept alive: CPython writes caught signal numbers into the second one


def flush_std_streams():
    """Flush stdout and stderr, ignoring streams that are closed or broken (they must not prevent an abort)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def install_abort_handler(comm):
    """Make any rank's failure end the whole job instead of leaving the other ranks blocked in a collective.

    An unhandled exception (sys.excepthook) prints one message naming the rank, with the traceback, then calls
    comm.abort(1). SIGINT or SIGTERM (when installed from the main thread) print a message and comm.abort(128 + signal).
    Idempotent. Signals are served by a watcher thread woken through signal.set_wakeup_fd, because a Python signal
    handler only runs when the main thread returns to the interpreter, never while it waits inside MPI_Allreduce; the
    thread calls MPI_Abort concurrently with the main thread, which mpi4py's default thread level (MPI_THREAD_MULTIPLE)
    permits. Skipped if something else (an event loop) already owns the wakeup fd.
    """
    global _abort_handler_installed
    if _abort_handler_installed:
        return
    _abort_handler_installed = True
    who = f"rank {comm.rank} of {comm.size}"

    def excepthook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        warn(f"dpnet: {who} failed with an unhandled {exc_type.__name__}; aborting all ranks\n{text}")
        comm.abort(1)

    sys.excepthook = excepthook
    if threading.current_thread() is threading.main_thread():
        _abort_on_signals(comm, who)


def _abort_on_signals(comm, who):
    global _signal_sockets
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    if previous != -1:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return
    _signal_sockets = (reader, writer)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # CPython writes to the wakeup fd only for signals that have a Python handler; the watcher does the work.
        signal.signal(sig, lambda signum, frame: None)

    def watch():
        signum = reader.recv(1)[0]
        warn(f"dpnet: {who} received {signal.Signals(signum).name}; aborting all ranks\n")
        comm.abort(128 + signum)

    threading.Thread(target=watch, name="dpnet-abort-on-signal", daemon=True).start()


@functools.lru_cache(maxsize=8)
def parse_fault(value):
    """(rank, step) from a $DPNET_FAULT_INJECT value, None for an empty one; ValueError for anything malformed."""
    if not value:
        return None
    try:
        fields = dict(item.split("=") for item in value.replace(" ", "").split(","))
        spec = int(fields.pop("rank")), int(fields.pop("step"))
    except (ValueError, KeyError):
        fields, spec = None, None
    if spec is None or fields:
        raise ValueError(f'{FAULT_ENV}={value!r}: expected "rank=R,step=S" with integers R and S')
    return spec


def fault_injection_point(comm, step):
    """Raise RuntimeError("injected fault ...") if $DPNET_FAULT_INJECT names this rank and `step` (tests only).

    `step` is whatever the caller counts (the Solver passes its iteration counter before the update). The variable is
    parsed once per distinct value, so an unset variable costs one dictionary lookup.
    """
    spec = parse_fault(os.environ.get(FAULT_ENV))
    if spec is not None and spec == (comm.rank, step):
        raise RuntimeError(f"injected fault on rank {comm.rank} at step {step} ({FAULT_ENV}={os.environ[FAULT_ENV]})")
