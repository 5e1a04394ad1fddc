"""The collective watchdog: a job whose process stopped (SIGSTOP, a hung file system read) ends, naming that process.

Without it, every other process waits in its next collective for ever. `start_watchdog(comm, timeout)` (collective)
makes each process count the collectives it enters: the methods of `MPICommunicator` and the shared-memory barriers
of `NodeSharedArray` are wrapped with `collective(name)`, which costs one global lookup while no watchdog runs. A
thread on every process wakes every `poll` seconds. When its process has waited in one collective for more than
`timeout` seconds, it asks every other process where it is, over a duplicate of the communicator (no message of the
job can match the watchdog's). The others' threads answer: how many collectives their process has entered, and
whether it waits in one now. A process is late when it does not answer within `grace` seconds (stopped, or stuck
where Python cannot run) or when it runs outside the collectives; when every process waits, those in an earlier
collective are (the processes disagree on the order of collectives). The lowest waiting rank prints one message
naming the late ranks and ends the job with `comm.abort(EXIT_TIMEOUT)`; the other waiting ranks do the same a few
seconds later, should it fail to. A collective that completes meanwhile (the late process came back) cancels the
alarm.

The timeout must exceed the longest stretch one process spends outside the collectives while the others wait: a
training step, an evaluation, rank 0 writing a checkpoint or the TensorBoard events. Threads need MPI_THREAD_MULTIPLE
(mpi4py's default); with a lower thread level `start_watchdog` raises RuntimeError.
"""

import functools
import threading
import time

import numpy as np

from .environment import warn

EXIT_TIMEOUT = 124  # as timeout(1) exits
_ASK, _ANSWER = 7301, 7302  # message tags on the watchdog's own communicator
_active = None  # the running Watchdog of this process, if any


def collective(name):
    """Decorator: the wrapped method is a collective the watchdog times (nested calls count once)."""

    def wrap(method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            dog = _active
            if dog is None:
                return method(*args, **kwargs)
            dog.enter(name)
            try:
                return method(*args, **kwargs)
            finally:
                dog.leave()

        return timed

    return wrap


class Watchdog:
    """One process's watchdog (see the module's docstring). `comm` is an MPICommunicator; `timeout` in seconds;
    `prefix` starts the message (e.g. "dpnet-train: error"); `poll` and `grace` default to values derived from the
    timeout (at most 1 s and 2 s + two polls)."""

    def __init__(self, comm, timeout, prefix="dpnet", poll=None, grace=None):
        mpi = comm._MPI
        if mpi.Query_thread() < mpi.THREAD_MULTIPLE:
            raise RuntimeError("the collective watchdog needs MPI_THREAD_MULTIPLE (mpi4py's default thread level)")
        self.comm, self.timeout, self.prefix = comm, float(timeout), prefix
        self.poll = min(1.0, self.timeout / 4) if poll is None else float(poll)
        self.grace = 2.0 + 2 * self.poll if grace is None else float(grace)
        self._side = comm.comm.Dup()  # collective
        self._mpi = mpi
        self._count = 0  # collectives entered
        self._depth = 0  # > 0 while in one
        self._since = 0.0  # when the current one was entered (time.monotonic)
        self._name = ""
        self._stop = threading.Event()
        self._sends = []  # pending sends, kept alive until they complete
        self._thread = threading.Thread(target=self._watch, name="dpnet-collective-watchdog", daemon=True)

    # -- the main thread ------------------------------------------------------------------------------------------
    def enter(self, name):
        if self._depth == 0:
            self._count += 1
            self._name, self._since = name, time.monotonic()
        self._depth += 1

    def leave(self):
        self._depth -= 1

    # -- the watcher thread ---------------------------------------------------------------------------------------
    def _state(self):
        """(collectives entered, waiting in one now: 0 or 1, seconds waited in it)."""
        depth, count, since = self._depth, self._count, self._since
        return count, int(depth > 0), (time.monotonic() - since) if depth else 0.0

    def _send(self, values, dest, tag):
        buf = np.array(values, dtype=np.float64)
        self._sends = [(req, b) for req, b in self._sends if not req.Test()]
        self._sends.append((self._side.Isend(buf, dest=dest, tag=tag), buf))

    def _answer_questions(self):
        status = self._mpi.Status()
        while self._side.Iprobe(source=self._mpi.ANY_SOURCE, tag=_ASK, status=status):
            question = np.empty(1, dtype=np.float64)
            self._side.Recv(question, source=status.Get_source(), tag=_ASK)
            self._send([question[0], *self._state()], status.Get_source(), _ANSWER)  # the question, echoed

    def _watch(self):
        while not self._stop.wait(self.poll):
            self._answer_questions()
            count, waiting, waited = self._state()
            if waiting and waited > self.timeout:
                self._find_the_late(count, waited)  # returns only if the collective completed meanwhile

    def _still_waiting(self, count):
        """Whether this process still waits in its collective number `count` (no progress since the alarm)."""
        return self._depth > 0 and self._count == count and not self._stop.is_set()

    def _find_the_late(self, count, waited):
        rank, size = self.comm.rank, self.comm.size
        for other in range(size):
            if other != rank:
                self._send([count], other, _ASK)
        answers, status = {}, self._mpi.Status()
        deadline = time.monotonic() + self.grace
        while len(answers) < size - 1 and time.monotonic() < deadline:
            self._answer_questions()
            if self._side.Iprobe(source=self._mpi.ANY_SOURCE, tag=_ANSWER, status=status):
                answer = np.empty(4, dtype=np.float64)
                self._side.Recv(answer, source=status.Get_source(), tag=_ANSWER)
                if int(answer[0]) == count:  # not a late answer to an earlier alarm
                    answers[status.Get_source()] = (int(answer[1]), bool(answer[2]), float(answer[3]))
            else:
                time.sleep(0.01)
        late = {}
        for other in range(size):
            if other == rank:
                continue
            if other not in answers:
                late[other] = f"did not answer within {self.grace:g} s (stopped, or stuck where Python cannot run)"
            elif not answers[other][1]:
                late[other] = (f"is running outside the collectives (it has entered {answers[other][0]}; rank {rank} "
                               f"waits in its collective number {count})")
        if not late:  # everyone waits: those in an earlier collective than this one's
            late = {other: f"waits in its collective number {answer[0]}, rank {rank} in number {count} (the "
                           f"processes disagree on the order of collectives)"
                    for other, answer in answers.items() if answer[0] < count}
        waiting = [rank] + [other for other, answer in answers.items() if answer[1]]
        if late:
            what = "; ".join(f"rank {other} {why}" for other, why in sorted(late.items()))
            names = ", ".join(map(str, sorted(late)))
            verb = "are" if len(late) > 1 else "is"
            text = (f"rank{'s' * (len(late) > 1)} {names} of {size} {verb} late: rank {rank} has waited {waited:.1f} "
                    f"s in the collective {self._name} (more than the timeout, {self.timeout:g} s); {what}")
        else:
            text = (f"every rank waits in a collective (rank {rank} for {waited:.1f} s in {self._name}, more than the "
                    f"timeout, {self.timeout:g} s), none arrived late: the collectives never complete")
        if rank != min(waiting):  # the lowest waiting rank ends the job; if it could not, this one does
            deadline = time.monotonic() + self.grace + 3.0
            while time.monotonic() < deadline and self._still_waiting(count):
                self._answer_questions()  # a rank that fires later must not take this one for a stopped one
                time.sleep(0.05)
        if not self._still_waiting(count):  # the late process arrived after all: go on watching
            return
        warn(f"{self.prefix}: {text}; aborting all ranks\n")
        self.comm.abort(EXIT_TIMEOUT)

    def start(self):
        global _active
        _active = self
        self._thread.start()
        return self

    def stop(self):
        """Stop watching (not collective); the duplicate communicator is left to MPI_Finalize."""
        global _active
        if _active is self:
            _active = None
        self._stop.set()


def start_watchdog(comm, timeout, prefix="dpnet"):
    """Collective: start the watchdog of this process (see the module's docstring) and return it; None for one
    process or timeout None (nothing to watch)."""
    if timeout is None or comm.size == 1:
        return None
    return Watchdog(comm, timeout, prefix=prefix).start()
