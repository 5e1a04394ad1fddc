"""`python -m dpnet.train` under hostile and careless use: nothing lost, nothing overwritten, no traceback.

One section per item of docs/bad-input.md: where a resumed run writes (1), plugins that exit at import or in a hook
(2), a full disk (3), a log directory of another run (4), out-of-range values and tampered checkpoints (5), reads
without a bound (6), what a killed checkpoint write leaves (7), symbolic links planted in the log directory (8),
BLAS threads and SIGTERM (9), a stopped MPI rank and the collective watchdog (10), what --shared-memory promises (11).
Every test asserts the exit code and the message, and that no file outside the run's own folders changed.

Bad input that fails before training runs in this process; runs are subprocesses on a slice of the real CIFAR-10
($DPNET_TEST_DATA_DIR), with the helpers of tests/test_train.py.
"""

import errno
import json
import os
import re
import signal
import stat
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from processes import group_alive, kill_group, run_in_group, run_main, start_in_group
from scripts import load_test_module

from dpnet import train
from dpnet.parallel import environment

_helpers = load_test_module("test_train")
REPO, cli, checkpoint, _env = _helpers.REPO, _helpers.cli, _helpers.checkpoint, _helpers._env

# 2 iterations per epoch, 2 epochs, float64, sgd_momentum (its velocity) and batchnorm (running statistics).
RECIPE = ["--num-train", "200", "--batch-size", "100", "--epochs", "2", "--dtype", "float64", "--seed", "3", "--lr",
          "1e-2", "--no-augment", "--warmup-epochs", "0", "--quiet", "--zca", "0", "--ema", "0", "--no-test-flips"]
TINY = [*RECIPE, "--hidden-dims", "16"]


# ----------------------------------------------------------------------------------------------- helpers
def snapshot(root, *own):
    """{relative path: (file type, size, mtime, link target)} of everything under `root`, the folders `own` (the
    run's own) and what they hold left out."""
    root, own = Path(root), [Path(o).absolute() for o in own]
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if any(path == o or o in path.parents for o in own):
                continue
            info = path.lstat()
            state[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns,
                                                  os.readlink(path) if path.is_symlink() else None)
    return state


def ok_run(result, code=0):
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_error(err, expected):
    """`err` is one message (one line, or one block for several broken plugins) holding every expected text."""
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in err, err
    assert err.count("dpnet-train: error") == 1 and "Traceback" not in err, err


pytestmark = pytest.mark.usefixtures("restore_blas_threads")  # main() in this process limits the BLAS pool


def _main(argv, capsys):
    """train.main in this process: (exit code, stderr)."""
    return run_main(train.main, argv, capsys)


@pytest.fixture(scope="module")
def base(cifar10_dir, dpnet_cache_dir, tmp_path_factory):
    """A finished tiny run: its folder (last.npz, best.npz, config.toml, events, curves.png)."""
    work = tmp_path_factory.mktemp("base")
    ok_run(cli(*TINY, "--data-dir", cifar10_dir, "--logdir", work / "run", cwd=work, cache=dpnet_cache_dir))
    return work / "run"


def copy_run(base, folder):
    """A copy of the base run's files (not its events) in `folder`."""
    folder.mkdir(parents=True)
    for name in ("last.npz", "best.npz", "config.toml"):
        (folder / name).write_bytes((base / name).read_bytes())
    return folder


def tampered(source, target, arrays=None, meta=None, drop=()):
    """Write `target`: the checkpoint `source` with arrays replaced or added, meta fields replaced, members dropped."""
    with np.load(source, allow_pickle=False) as archive:
        members = {key: archive[key] for key in archive.files}
    document = json.loads(str(members["meta"]))
    document.update(meta or {})
    members.update(arrays or {})
    members["meta"] = np.array(json.dumps(document))
    for key in drop:
        del members[key]
    np.savez(target, **members)
    return target


@pytest.fixture
def in_process(cifar10_dir, dpnet_cache_dir, tmp_path, monkeypatch):
    """Bad input run in this process from tmp_path (the real data's cache, never a download)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    monkeypatch.setenv("DPNET_DATA_DIR", str(cifar10_dir))
    for var in environment.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# ----------------------------------------------------------------------------------------------- 1: where a run writes
@pytest.mark.timeout(120)
def test_a_resumed_run_writes_where_this_invocation_says(base, cifar10_dir, dpnet_cache_dir, tmp_path):
    run_a = copy_run(base, tmp_path / "A")
    elsewhere = {"logdir": str(tmp_path / "edited-logs"), "checkpoint_dir": str(tmp_path / "edited-ck")}
    config = checkpoint(run_a / "last.npz")[1]["config"]
    tampered(run_a / "last.npz", run_a / "last.npz", meta={"config": {**config, **elsewhere}})
    a_before = {name: (run_a / name).read_bytes() for name in ("last.npz", "best.npz")}
    before = snapshot(tmp_path, run_a, tmp_path / "B")

    result = ok_run(cli("--resume", run_a / "last.npz", "--epochs", "3", "--logdir", tmp_path / "B",
                        cwd=tmp_path, cache=dpnet_cache_dir))
    assert "test accuracy" in result.stdout
    assert checkpoint(tmp_path / "B" / "last.npz")[1]["epoch"] == 3
    assert list((tmp_path / "B").glob("events.out.tfevents.*")) and (tmp_path / "B" / "config.toml").is_file()
    assert {name: (run_a / name).read_bytes() for name in a_before} == a_before  # A's checkpoints untouched
    assert sorted(p.name for p in run_a.iterdir()) == ["best.npz", "config.toml", "last.npz"]
    assert snapshot(tmp_path, run_a, tmp_path / "B") == before  # nothing else either: the edited folders never made

    # Without --logdir the run continues in the folder of the checkpoint named on the command line.
    ok_run(cli("--resume", run_a / "last.npz", "--epochs", "3", cwd=tmp_path, cache=dpnet_cache_dir))
    assert checkpoint(run_a / "last.npz")[1]["epoch"] == 3 and list(run_a.glob("events.out.tfevents.*"))
    assert snapshot(tmp_path, run_a, tmp_path / "B") == before


# ----------------------------------------------------------------------------------------------- 2: plugins
_PLUGINS = {
    "exits": "import sys\nsys.exit(0)\n",
    "parses": ("import argparse\nparser = argparse.ArgumentParser(prog='fx')\nparser.add_argument('--mine')\n"
               "parser.parse_args()\n"),
    "hookexit": ("import sys\nfrom dpnet.registry import hookimpl\n\n\n@hookimpl\ndef dpnet_layers():\n"
                 "    print('leaving now')\n    sys.exit(3)\n"),
}


def fake_plugins(site):
    """Distributions dpnetfx-<name> whose entry point `dpnet` loads the modules of _PLUGINS."""
    for name, source in _PLUGINS.items():
        info = site / f"dpnetfx_{name}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dpnetfx-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[dpnet]\nfx_{name} = dpnetfx_{name}\n")
        (site / f"dpnetfx_{name}.py").write_text(source)


@pytest.mark.timeout(120)
def test_a_plugin_that_exits_at_import_or_in_a_hook_is_reported_as_broken(cifar10_dir, dpnet_cache_dir, tmp_path):
    site = tmp_path / "site"
    fake_plugins(site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1"}
    before = snapshot(tmp_path)
    result = ok_run(cli(*TINY, "--data-dir", cifar10_dir, "--logdir", tmp_path / "logs", cwd=tmp_path,
                        cache=dpnet_cache_dir, **env), code=2)
    one_error(result.stderr, ["a plugin is broken: 3 plugins failed to load",
                              "plugin 'fx_exits' (distribution dpnetfx-exits 0.1", "failed to import: SystemExit: 0",
                              "plugin 'fx_parses'", "failed to import: SystemExit: 2 (it printed: usage: fx",
                              "plugin 'fx_hookexit'", "raised in its dpnet_layers hook: SystemExit: 3 (it printed: "
                              "leaving now)", "DPNET_DISABLE_PLUGINS=fx_exits"])
    assert result.stdout == "" and not (tmp_path / "logs").exists()

    listing = run_in_group([sys.executable, "-m", "dpnet.plugins", "--json"], 60, cwd=tmp_path,
                           env=_env(dpnet_cache_dir, **env))
    assert listing.returncode == 2, listing.stderr  # the listing's answer to a broken plugin (for CI), bad input
    report = json.loads(listing.stdout)  # nothing a plugin printed got into the JSON
    status = {info["name"]: (info["status"], info["reason"]) for info in report["plugins"]}
    assert status["fx_exits"][0] == status["fx_parses"][0] == status["fx_hookexit"][0] == "error"
    assert "SystemExit: 0" in status["fx_exits"][1] and "SystemExit: 3" in status["fx_hookexit"][1]
    assert status["dpnet"][0] == "loaded" and "Traceback" not in listing.stderr
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- 3: a full disk
FULL_LOG_DISK = """
import errno, os, sys
from tensorboardX import record_writer
from dpnet import run_outputs, train

full = os.path.abspath(os.environ["FULL_DIR"])


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullFile:  # a file on the full disk: it can be created, not written
    def __init__(self, path):
        open(path, "wb").close()

    write = flush = no_space

    def close(self):
        pass


open_file, write_atomically = record_writer.open_file, run_outputs.write_atomically
record_writer.open_file = lambda p: FullFile(p) if os.path.abspath(p).startswith(full) else open_file(p)
run_outputs.write_atomically = (lambda p, w: no_space() if os.path.abspath(p).startswith(full)
                                else write_atomically(p, w))
sys.exit(train.main(sys.argv[1:]))
"""

FAILING_CHECKPOINT_DISK = """
import errno, os, sys
import numpy as np
from dpnet import train

failures, savez = int(os.environ["CHECKPOINT_FAILURES"]), np.savez


def full_savez(file, **arrays):  # part of the checkpoint is written, then the disk is full
    global failures
    if failures > 0:
        failures -= 1
        file.write(bytes(65536))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return savez(file, **arrays)


np.savez = full_savez
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_a_full_log_disk_loses_neither_the_checkpoints_nor_the_run(cifar10_dir, dpnet_cache_dir, tmp_path):
    logs, ck = tmp_path / "full" / "logs", tmp_path / "ck"
    before = snapshot(tmp_path, tmp_path / "full", ck)
    result = ok_run(cli(*TINY, "--epochs", "3", "--data-dir", cifar10_dir, "--logdir", logs, "--checkpoint-dir", ck,
                        script=FULL_LOG_DISK, cwd=tmp_path, cache=dpnet_cache_dir, FULL_DIR=str(tmp_path / "full")),
                    code=train.EXIT_OUTPUT_FAILED)
    lines = result.stderr.strip().splitlines()
    space = os.strerror(errno.ENOSPC)
    assert lines == [
        f"dpnet-train: error: cannot write {logs / 'config.toml'} ({space}): the run goes on without it",
        f"dpnet-train: error: cannot write the TensorBoard events in {logs} ({space}): the run goes on without them",
        f"dpnet-train: error: cannot write the plot {logs / 'curves.png'} ({space}): the run ends without it"], lines
    assert "test accuracy" in result.stdout
    assert checkpoint(ck / "last.npz")[1]["epoch"] == 3 and checkpoint(ck / "best.npz")[1]["epoch"] >= 1
    assert snapshot(tmp_path, tmp_path / "full", ck) == before


@pytest.mark.timeout(120)
def test_a_failing_checkpoint_is_reported_and_tried_again_at_the_next_epoch(cifar10_dir, dpnet_cache_dir, tmp_path):
    logs = tmp_path / "logs"
    before = snapshot(tmp_path, logs)
    result = ok_run(cli(*TINY, "--epochs", "3", "--data-dir", cifar10_dir, "--logdir", logs,
                        script=FAILING_CHECKPOINT_DISK, cwd=tmp_path, cache=dpnet_cache_dir, CHECKPOINT_FAILURES="2"),
                    code=train.EXIT_OUTPUT_FAILED)
    lines = result.stderr.strip().splitlines()
    assert lines == [f"dpnet-train: error: cannot write the checkpoint of epoch {epoch} in {logs} "
                     f"({os.strerror(errno.ENOSPC)}): the previous checkpoint is kept; the next epoch tries again"
                     for epoch in (1, 2)], lines
    assert checkpoint(logs / "last.npz")[1]["epoch"] == 3
    assert not list(logs.glob(".tmp-*")) and (logs / "curves.png").is_file()
    assert snapshot(tmp_path, logs) == before


# ----------------------------------------------------------------------------------------------- 4: a run's folder
def test_a_new_run_refuses_a_folder_holding_another_runs_outputs(base, in_process, capsys):
    tmp_path = in_process
    other = copy_run(base, tmp_path / "other")
    events = tmp_path / "events-only"
    events.mkdir()
    (events / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    before = snapshot(tmp_path)
    code, err = _main([*TINY, "--logdir", other], capsys)
    assert code == 2
    one_error(err, f"the log directory (--logdir) {other} holds another run's checkpoints (last.npz, best.npz), "
                   f"which this run would overwrite: resume that run with --resume {other / 'last.npz'}, or pick "
                   f"another --logdir")
    code, err = _main([*TINY, "--logdir", tmp_path / "new", "--checkpoint-dir", other], capsys)
    assert code == 2
    one_error(err, f"the checkpoint directory (--checkpoint-dir) {other} holds another run's checkpoints")
    code, err = _main([*TINY, "--logdir", events], capsys)
    assert code == 2
    one_error(err, f"the log directory (--logdir) {events} holds another run's TensorBoard events, which this run "
                   "would mix with its own: pick another --logdir")
    # Resuming one run into the folder of another is refused too.
    run_a = copy_run(base, tmp_path / "A")
    before = snapshot(tmp_path)
    code, err = _main(["--resume", run_a / "last.npz", "--epochs", "3", "--logdir", other], capsys)
    assert code == 2
    one_error(err, f"{other} holds another run's checkpoints")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- 5: bad values
def _toml(tmp_path, data):
    path = tmp_path / "run.toml"
    path.write_bytes(data)
    return path


VALUES = {
    "seed beyond int64": (["--seed", "18446744073709551616"],
                          "--seed must be between 0 and 2**63 - 1 (9223372036854775807), got 18446744073709551616"),
    "warm-up 1e308": (["--warmup-epochs", "1e308"], "--warmup-epochs must be at most 1000000, got 1e+308"),
    "enormous hidden layer": (["--hidden-dims", "100000000"],
                              ["--hidden-dims 100000000 needs at least ", "TiB of memory (308,500,000,010 float64 "
                               "parameters, times 3: gradients and the best copy), but "]),
    "enormous affine units": (["--layers", "affine:units=100000000000,relu,affine:units=10"],
                              "--layers affine:units=100000000000,relu,affine:units=10 needs at least "),
    "crop padding 1000000": (["--crop-padding", "1000000"], "--crop-padding must be between 0 and 31 (the images "
                             "are 32 pixels wide: with more padding some crops would hold no image at all)"),
    "non-UTF-8 TOML": (lambda t: ["--config", _toml(t, b'lr = 0.1\nactivation = "r\xe9lu"\n')],
                       lambda t: f"{t / 'run.toml'} is not UTF-8 text (byte 25); TOML files are UTF-8"),
    "300-character log directory": (lambda t: ["--logdir", t / ("x" * 300)],
                                    "cannot be created: the name xxxxxxxx"),
    "a timeout of 0": (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0.0"),
}


@pytest.mark.parametrize("case", VALUES)
def test_out_of_range_values_end_with_one_message_and_exit_code_2(case, in_process, capsys):
    args, expected = VALUES[case]
    tmp_path = in_process
    args = args(tmp_path) if callable(args) else args
    expected = expected(tmp_path) if callable(expected) else expected
    before = snapshot(tmp_path)
    code, err = _main([*(RECIPE if "--layers" in args else TINY), "--logdir", tmp_path / "logs", *args], capsys)
    assert code == 2, err
    one_error(err, expected)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("variable, value, expected", [
    ("DPNET_BLAS_THREADS", "abc", "DPNET_BLAS_THREADS must be a positive integer, got 'abc'"),
    ("OMP_NUM_THREADS", "0", "OMP_NUM_THREADS must be a positive integer, got '0'"),
])
def test_bad_thread_variables_end_with_one_message_and_exit_code_2(variable, value, expected, in_process, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv(variable, value)
    before = snapshot(in_process)
    code, err = _main([*TINY, "--logdir", in_process / "logs"], capsys)
    assert code == 2
    one_error(err, expected)
    assert snapshot(in_process) == before


def _tampers(last):
    """name -> (tampered(...) keywords, the expected message), for the base run's last.npz (iteration 4)."""
    _, meta = checkpoint(last)
    with np.load(last, allow_pickle=False) as archive:
        w1, order = archive["param/W1"], archive["epoch_order"]
    nan = w1.copy()
    nan[0, 0] = np.nan
    return {
        "meta epoch 'x'": (dict(meta={"epoch": "x"}), 'is not a readable dpnet checkpoint: meta epoch must be an '
                                                     'integer >= 0, got "x"'),
        "meta iteration -5": (dict(meta={"iteration": -5}), "meta iteration must be an integer >= 0, got -5"),
        "meta config null": (dict(meta={"config": None}), "meta config must be a table (the run's configuration), "
                                                          "got null"),
        "meta losses and iterations disagree": (dict(meta={"iteration": 6, "epoch": 3}),
                                                "meta has 4 losses for 6 iterations"),
        "meta epoch out of step": (dict(meta={"epoch": 1}), "meta epoch 1 does not fit iteration 4 (2 iterations "
                                                            "per epoch)"),
        "a value of the saved configuration": (dict(meta={"config": {**meta["config"], "lr": "fast"}}),
                                               "the configuration saved in {last}: lr must be a number, got 'fast'"),
        "optim scalar": (dict(meta={"optim_scalars": {**meta["optim_scalars"], "W1": {"momentum": "x",
                                                                                      "learning_rate": 0.01}}}),
                         "meta optim_scalars W1.momentum must be a finite number, got 'x'"),
        "optim array of another shape": (dict(arrays={"optim/W2/velocity": np.zeros(5)}),
                                         "optim/W2/velocity has shape [5], the run needs [16, 10]"),
        "a missing velocity": (dict(drop=["optim/W1/velocity"]), "optim/W1/velocity is missing (the run at "
                                                                 "iteration 4 has it)"),
        "norm of another shape": (dict(arrays={"norm/0/running_mean": np.zeros(3)}),
                                  "norm/0/running_mean has shape [3], the run needs [16]"),
        "negative running variance": (dict(arrays={"norm/0/running_var": -np.ones(16)}),
                                      "norm/0/running_var holds negative variances"),
        "a norm of no layer": (dict(arrays={"norm/7/running_mean": np.zeros(16)}),
                               "norm/7/running_mean is no part of this model's or update rule's state"),
        "best NaN": (dict(arrays={"best/W1": nan}), "best/W1 holds NaN or infinite values"),
        "best of another shape": (dict(arrays={"best/W1": w1[:, :3]}), "best/W1 has shape [3072, 3], the run needs "
                                                                        "[3072, 16]"),
        "a missing best": (dict(drop=["best/b2"]), "best/b2 is missing"),
        "epoch order out of range": (dict(arrays={"epoch_order": order + 1000}),
                                     "epoch_order is not an order of the 200 training images"),
        "epoch order of floats": (dict(arrays={"epoch_order": order.astype(np.float64)}),
                                  "epoch_order is not an order of the 200 training images"),
        "parameters of another dtype": (dict(arrays={"param/W1": w1.astype(np.float32)}),
                                        "W1 is float32[3072, 16] in the checkpoint but float64[3072, 16] in the model"),
        "a member of no model": (dict(arrays={"param/W9": w1[:2]}), "W9 is in the checkpoint but not in the model"),
        "a text array": (dict(arrays={"norm/0/running_mean": np.array(["a"] * 16)}),
                         "norm/0/running_mean is <U1, the run needs float64"),
        "a pickled object array": (dict(arrays={"norm/0/running_mean": np.array([Path("x")] * 16, dtype=object)}),
                                   "is not a readable dpnet checkpoint: norm/0/running_mean has the dtype object, "
                                   "which dpnet never writes"),
    }


TAMPERS = ["meta epoch 'x'", "meta iteration -5", "meta config null", "meta losses and iterations disagree",
           "meta epoch out of step", "a value of the saved configuration", "optim scalar",
           "optim array of another shape", "a missing velocity", "norm of another shape", "negative running variance",
           "a norm of no layer", "best NaN", "best of another shape", "a missing best", "epoch order out of range",
           "epoch order of floats", "parameters of another dtype", "a member of no model", "a text array",
           "a pickled object array"]


@pytest.mark.parametrize("tamper", TAMPERS)
def test_tampered_checkpoints_are_refused_before_anything_is_restored(tamper, base, in_process, capsys):
    tmp_path = in_process
    run_a = copy_run(base, tmp_path / "A")
    changes, expected = _tampers(run_a / "last.npz")[tamper]
    tampered(run_a / "last.npz", run_a / "last.npz", **changes)
    before = snapshot(tmp_path)
    code, err = _main(["--resume", run_a / "last.npz", "--epochs", "3"], capsys)
    assert code == 2, err
    one_error(err, [str(run_a / "last.npz"), expected.format(last=run_a / "last.npz")])
    assert snapshot(tmp_path) == before  # nothing written, not even in the checkpoint's own folder


# ----------------------------------------------------------------------------------------------- 6: bounded reads
def _peak(call):
    """(call(), the peak of Python and NumPy allocations during it, bytes)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _inflating_checkpoint(source, target, nbytes):
    """`source` with param/W1 replaced by a deflated member of `nbytes` zeros (a few hundred KB on disk)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            if info.filename != "param/W1.npy":
                new.writestr(info.filename, old.read(info))
        header = {"descr": "<f8", "fortran_order": False, "shape": (nbytes // 8,)}
        with new.open("param/W1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                member.write(chunk)
    return target


MEMORY_LIMIT = 512 << 20  # address space of the runs below: less than what an unbounded read would take


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["config", "resume", "inflating checkpoint"])
def test_reads_are_bounded(what, base, dpnet_cache_dir, tmp_path):
    """/dev/zero as --config or --resume, and a 1 MB checkpoint that inflates to 512 MiB, each end with one message in
    a process whose address space is limited to 512 MiB (an unbounded read would fail there, or eat the machine)."""
    if what == "inflating checkpoint":
        run_a = copy_run(base, tmp_path / "A")
        path = _inflating_checkpoint(base / "last.npz", run_a / "last.npz", MEMORY_LIMIT)
        assert path.stat().st_size < 2 << 20
        args = ["--resume", path]
        expected = f"checkpoint {path} is not a readable dpnet checkpoint: its members would inflate to "
    else:
        args = [f"--{what}", "/dev/zero", "--logdir", tmp_path / "logs"]
        expected = ("the config file /dev/zero is larger than 1 MiB: not a configuration" if what == "config" else
                    "checkpoint /dev/zero is not a readable dpnet checkpoint: it is not a regular file")
    before = snapshot(tmp_path)
    result = run_in_group([sys.executable, "-m", "dpnet.train", *map(str, args)], 60, cwd=tmp_path,
                          env=_env(dpnet_cache_dir), preexec_fn=_limit_memory)
    ok_run(result, code=2)
    one_error(result.stderr, expected)
    assert snapshot(tmp_path) == before


def test_a_checkpoint_member_larger_than_the_model_needs_is_not_read(base, in_process, capsys):
    tmp_path = in_process
    run_a = copy_run(base, tmp_path / "A")
    with np.load(base / "last.npz", allow_pickle=False) as archive:
        w1 = archive["param/W1"]
    big = np.zeros((64, *w1.shape))  # 25 MB stored: the zip directory says so before a byte of it is read
    tampered(run_a / "last.npz", run_a / "last.npz", arrays={"optim/W1/velocity": big})
    before = snapshot(tmp_path)
    (code, err), peak = _peak(lambda: _main(["--resume", run_a / "last.npz", "--epochs", "3"], capsys))
    assert code == 2
    one_error(err, [f"checkpoint {run_a / 'last.npz'} is not a readable dpnet checkpoint: optim/W1/velocity holds ",
                    f" bytes, more than this run's optim/W1/velocity needs ({w1.nbytes})"])
    assert peak < big.nbytes / 2, peak
    assert snapshot(tmp_path) == before


def test_the_download_is_bounded(tmp_path, monkeypatch):
    from dpnet.data import download

    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(bytes(3 << 20))
    before = snapshot(tmp_path)
    with pytest.raises(download.DownloadError, match="the server offers 3145728 bytes, more than the 1048576"):
        download.download_CIFAR10(tmp_path / "data", url=archive.as_uri(), max_bytes=1 << 20)

    class Endless:  # a server that announces no length and never stops
        headers = {}
        sent = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            Endless.sent += n
            return bytes(n)

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: Endless())
    with pytest.raises(download.DownloadError, match="the transfer went past 1048576 bytes"):
        download.download_CIFAR10(tmp_path / "data", url="http://endless.invalid/", max_bytes=1 << 20)
    assert Endless.sent <= (1 << 20) + 1
    assert list((tmp_path / "data").iterdir()) == []  # the partial downloads were removed
    assert set(snapshot(tmp_path)) - set(before) == {"data"}


# ----------------------------------------------------------------------------------------------- 7: killed writes
KILLED_IN_A_CHECKPOINT = """
import os, signal, sys
import numpy as np
from dpnet import train

kill_at, calls, savez = int(os.environ["KILL_AT_SAVE"]), 0, np.savez


def savez_then_die(file, **arrays):  # SIGKILL in the middle of writing a checkpoint
    global calls
    calls += 1
    if calls == kill_at:
        file.write(bytes(1 << 20))
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return savez(file, **arrays)


np.savez = savez_then_die
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_resuming_removes_what_a_write_killed_by_sigkill_left(cifar10_dir, dpnet_cache_dir, tmp_path):
    logs = tmp_path / "logs"
    before = snapshot(tmp_path, logs)
    killed = cli(*TINY, "--epochs", "3", "--data-dir", cifar10_dir, "--logdir", logs, script=KILLED_IN_A_CHECKPOINT,
                 cwd=tmp_path, cache=dpnet_cache_dir, KILL_AT_SAVE="2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = list(logs.glob(".tmp-*.npz"))
    assert len(left) == 1 and left[0].stat().st_size == 1 << 20
    assert checkpoint(logs / "last.npz")[1]["epoch"] == 1

    resumed = ok_run(cli("--resume", logs / "last.npz", "--no-quiet", cwd=tmp_path, cache=dpnet_cache_dir))
    assert (f"dpnet-train: removed 1 temporary file (1.0 MB) that a killed run left in {logs}: {left[0].name}"
            in resumed.stdout)
    assert not list(logs.glob(".tmp-*")) and checkpoint(logs / "last.npz")[1]["epoch"] == 3
    assert snapshot(tmp_path, logs) == before


# ----------------------------------------------------------------------------------------------- 8: planted links
@pytest.mark.timeout(120)
def test_config_toml_and_curves_png_replace_planted_links_instead_of_following_them(base, dpnet_cache_dir, tmp_path):
    run_a = copy_run(base, tmp_path / "A")
    victims = {"config.toml": tmp_path / "precious.toml", "curves.png": tmp_path / "precious.png"}
    for name, victim in victims.items():
        victim.write_text(f"precious {name}\n")
        (run_a / name).unlink(missing_ok=True)
        (run_a / name).symlink_to(victim)
    before = snapshot(tmp_path, run_a)
    ok_run(cli("--resume", run_a / "last.npz", "--epochs", "3", cwd=tmp_path, cache=dpnet_cache_dir))
    for name, victim in victims.items():
        assert victim.read_text() == f"precious {name}\n"
        assert not (run_a / name).is_symlink() and (run_a / name).is_file()
    assert (run_a / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "epochs = 3" in (run_a / "config.toml").read_text()
    assert snapshot(tmp_path, run_a) == before


# ----------------------------------------------------------------------------------------------- 9: threads, SIGTERM
def test_more_blas_threads_than_cores_are_refused_unless_forced(in_process, capsys, monkeypatch):
    tmp_path = in_process
    before = snapshot(tmp_path)
    cores = environment.usable_cores()
    code, err = _main([*TINY, "--logdir", tmp_path / "logs", "--blas-threads", "100000"], capsys)
    assert code == 2
    one_error(err, f"--blas-threads asks for 100000 BLAS threads but this process may use {cores} "
                   f"core{'s' * (cores != 1)}: more threads than cores make every step slower (pass "
                   "--force-blas-threads to run so anyway)")
    monkeypatch.setenv("DPNET_BLAS_THREADS", str(cores + 1))
    code, err = _main([*TINY, "--logdir", tmp_path / "logs"], capsys)
    assert code == 2 and f"$DPNET_BLAS_THREADS asks for {cores + 1} BLAS threads" in err
    # Forced, the threads are accepted: the run goes on to the next check (here: no data where it is told to look).
    code, err = _main([*TINY, "--logdir", tmp_path / "logs", "--force-blas-threads", "--data-dir",
                       tmp_path / "nowhere"], capsys)
    assert code == 2
    one_error(err, "CIFAR-10 not found in --data-dir")
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, train.EXIT_TERMINATED, r"terminated \(SIGTERM\)"),
                                             (signal.SIGINT, train.EXIT_INTERRUPTED, "interrupted")],
                         ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_a_signal_to_a_single_process_says_how_to_resume(sig, code, said, cifar10_dir, dpnet_cache_dir, tmp_path):
    logs = tmp_path / "logs"
    before = snapshot(tmp_path, logs)
    command = [sys.executable, "-m", "dpnet.train", *TINY, "--num-train", "1000", "--epochs", "1000", "--data-dir",
               cifar10_dir, "--logdir", logs]
    proc = start_in_group([str(c) for c in command], cwd=tmp_path, env=_env(dpnet_cache_dir))
    try:
        deadline = time.monotonic() + 60
        while not (logs / "last.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == code, stderr
    assert re.fullmatch(rf"\ndpnet-train: {said} at iteration \d+; resume with: python -m "
                        rf"dpnet.train --resume {re.escape(str(logs / 'last.npz'))}\n", stderr), stderr
    _, meta = checkpoint(logs / "last.npz")  # intact (written atomically), and resumable
    assert meta["epoch"] >= 1 and not list(logs.glob(".tmp-*"))
    assert snapshot(tmp_path, logs) == before


# ----------------------------------------------------------------------------------------------- 10: a stopped rank
@pytest.mark.timeout(120)
@pytest.mark.parametrize("action, why", [
    ("stop", "rank 1 did not answer within "),
    ("hang", "rank 1 is running outside the collectives"),
])
def test_the_watchdog_ends_a_job_whose_rank_stopped_naming_it(action, why, cifar10_dir, dpnet_cache_dir, mpiexec,
                                                              tmp_path):
    logs = tmp_path / "logs"
    before = snapshot(tmp_path, logs)
    command = [mpiexec, "-n", "2", sys.executable, "-m", "dpnet.train", *TINY, "--num-train", "400", "--data-dir",
               cifar10_dir, "--logdir", logs, "--timeout", "2"]
    env = _env(dpnet_cache_dir, DPNET_FAULT_INJECT=f"rank=1,step=5,action={action}")  # in epoch 2 (of 4 steps)
    start = time.monotonic()
    proc = start_in_group([str(c) for c in command], cwd=tmp_path, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
        alive = group_alive(proc.pid)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == train.EXIT_TIMEOUT, stderr
    assert not alive, "a process of the job outlived it"
    assert elapsed < 40, elapsed
    messages = [line for line in stderr.splitlines() if line.startswith("dpnet-train")]
    assert len(messages) == 1 and "Traceback" not in stderr, stderr
    assert re.match(r"dpnet-train: error: rank 1 of 2 is late: rank 0 has waited \d+\.\d s in the collective "
                    r"[\w -]+ \(more than the timeout, 2 s\); ", messages[0]), messages[0]
    assert why in messages[0] and messages[0].endswith("; aborting all ranks")
    assert checkpoint(logs / "last.npz")[1]["epoch"] == 1  # the last checkpoint before the stall is kept
    assert snapshot(tmp_path, logs) == before


@pytest.mark.timeout(120)
def test_the_watchdog_leaves_a_job_without_a_stall_alone(cifar10_dir, dpnet_cache_dir, mpiexec, tmp_path):
    logs = tmp_path / "logs"
    before = snapshot(tmp_path, logs)
    result = ok_run(cli(*TINY, "--num-train", "400", "--data-dir", cifar10_dir, "--logdir", logs, "--timeout", "2",
                        mpiexec=mpiexec, n=2, cwd=tmp_path, cache=dpnet_cache_dir, timeout=60))
    assert "test accuracy" in result.stdout and result.stderr == ""
    assert checkpoint(logs / "last.npz")[1]["epoch"] == 2
    assert snapshot(tmp_path, logs) == before


# ----------------------------------------------------------------------------------------------- 11: what is exact
def test_shared_memory_help_and_readme_say_what_is_exact_and_what_is_not(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--shared-memory" in text and "results are not bit for bit the same: in float64 they agree to rounding" \
        in text and "float32 runs follow visibly different trajectories" in text
    assert "the same results" not in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "in float64 to rounding, while float32 runs follow visibly different trajectories" in readme
    table = (REPO / "docs" / "bad-input.md").read_text()
    assert "docs/bad-input.md" in readme and not re.search(r"\|\s*1\s*\|", table)
