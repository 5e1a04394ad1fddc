"""How a data-parallel job fails: as a whole, never with some processes left waiting.

`install_abort_handler(comm)` turns an unhandled exception, SIGINT or SIGTERM on any rank into one message on stderr
and `comm.abort()` of the whole job; `set_abort_note(note)` adds what `note()` returns to the signal's message (the
command line says how to resume). `fault_injection_point(comm, step)` acts on the rank and step named by
$DPNET_FAULT_INJECT="rank=R,step=S[,action=A]" (tests only; rank and step required integers, spaces allowed around
them): action raise (the default) raises RuntimeError, stop sends the process SIGSTOP, hang sleeps for ever.
"""

import functools
import os
import signal
import socket
import sys
import threading
import time
import traceback

from .environment import warn

FAULT_ENV = "DPNET_FAULT_INJECT"
FAULT_ACTIONS = ("raise", "stop", "hang")

_abort_handler_installed = False
_signal_sockets = None  # kept alive: CPython writes caught signal numbers into the second one
_abort_note = None  # callable -> str added to a signal's message (set_abort_note)


def set_abort_note(note):
    """`note()` (a callable returning text, or None to drop it) is added to the message of a signal that ends the
    job, e.g. how to resume; it must not raise nor take locks the main thread may hold."""
    global _abort_note
    _abort_note = note


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
        try:
            note = _abort_note() if _abort_note is not None else ""
        except Exception:
            note = ""
        warn(f"dpnet: {who} received {signal.Signals(signum).name}; aborting all ranks{note}\n")
        comm.abort(128 + signum)

    threading.Thread(target=watch, name="dpnet-abort-on-signal", daemon=True).start()


@functools.lru_cache(maxsize=8)
def parse_fault(value):
    """(rank, step, action) from a $DPNET_FAULT_INJECT value, None for an empty one; ValueError for anything
    malformed."""
    if not value:
        return None
    try:
        fields = dict(item.split("=") for item in value.replace(" ", "").split(","))
        spec = int(fields.pop("rank")), int(fields.pop("step")), fields.pop("action", "raise")
    except (ValueError, KeyError):
        fields, spec = None, None
    if spec is None or fields or spec[2] not in FAULT_ACTIONS:
        raise ValueError(f'{FAULT_ENV}={value!r}: expected "rank=R,step=S" with integers R and S, optionally '
                         f'",action=A" with A one of {", ".join(FAULT_ACTIONS)}')
    return spec


def fault_injection_point(comm, step):
    """Act as $DPNET_FAULT_INJECT says if it names this rank and `step` (tests only): raise RuntimeError("injected
    fault ..."), stop the process (SIGSTOP, as a debugger or a hung device would) or hang it (sleep for ever).

    `step` is whatever the caller counts (the Solver passes its iteration counter before the update). The variable is
    parsed once per distinct value, so an unset variable costs one dictionary lookup.
    """
    spec = parse_fault(os.environ.get(FAULT_ENV))
    if spec is None or spec[:2] != (comm.rank, step):
        return
    if spec[2] == "stop":
        flush_std_streams()
        os.kill(os.getpid(), signal.SIGSTOP)
    elif spec[2] == "hang":
        while True:
            time.sleep(3600)
    else:
        raise RuntimeError(f"injected fault on rank {comm.rank} at step {step} ({FAULT_ENV}={os.environ[FAULT_ENV]})")
