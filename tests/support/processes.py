"""Commands the tests start, each in a process group (session) of its own that is killed whole on every exit path.

`run_in_group` is what every test that starts a process uses: whether the command ends by itself, overruns its own
timeout, or the test is interrupted (pytest-timeout's alarm, a failed assertion, Ctrl-C), nothing of its group
(orphaned MPI ranks included) outlives the call. `STARTED` records every group, so that the session can check that
none is left (tests/conftest.py).
"""

import os
import signal
import subprocess
import time

import pytest

STARTED = []  # process-group ids of every command started through run_in_group or registered with it


def kill_group(pgid):
    """SIGKILL every process of the group `pgid`; nothing happens when none is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid):
    """Whether any process of the group `pgid` still runs (zombies excluded)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def start_in_group(command, **popen_kwargs):
    """Popen(command) in a new session with text pipes for stdout and stderr, registered in STARTED. The caller
    must kill_group(proc.pid) in a `finally` (run_in_group does all of this)."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(command, text=True, start_new_session=True, **popen_kwargs)
    STARTED.append(proc.pid)
    return proc


def run_in_group(command, timeout, **popen_kwargs):
    """Run `command` (a list) to its end and return a subprocess.CompletedProcess with text stdout and stderr and an
    added `elapsed` (seconds). Still running after `timeout` seconds, it is killed with its whole group and the test
    fails. Keyword arguments go to subprocess.Popen (cwd, env, stdin...)."""
    start = time.monotonic()
    proc = start_in_group(command, **popen_kwargs)
    try:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(map(str, command))} still running after {timeout} s; killed its process group.\n"
                        f"stdout:\n{stdout}\nstderr:\n{stderr}", pytrace=False)
    finally:
        kill_group(proc.pid)  # whatever outlived the command, or all of it when the test is interrupted
        if proc.poll() is None:
            proc.wait()
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    result.elapsed = time.monotonic() - start
    return result


def run_main(main, argv, capsys):
    """A command's main(argv) run in this process: (its exit code, what it wrote to stderr, read through pytest's
    capsys)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err

