"""The command line with --mixup, --cutmix and --ema: end to end on a small slice of the real CIFAR-10 (one process and
`mpiexec -n 2`, a SIGKILLed run resumed), and their bad values. The helpers are tests/test_train.py's."""

import re
import signal

import numpy as np
import pytest
from processes import run_main
from scripts import load_test_module

from dpnet import train
from dpnet.monitor import read_scalars

_helpers = load_test_module("test_train")
KILLER, SMALL, cli, run_ok, checkpoint = (getattr(_helpers, name) for name in
                                          ("KILLER", "SMALL", "cli", "run_ok", "checkpoint"))
assert_same_state, printed_accuracy = _helpers.assert_same_state, _helpers.printed_accuracy
# The small recipe with crops and flips, both mixings and an average; float64, 10 iterations per epoch, 3 epochs.
MIXED = [*SMALL, "--augment", "--label-smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0",
         "--mix-probability", "0.9", "--ema", "0.8", "--ema-every", "2"]

pytestmark = pytest.mark.usefixtures("restore_blas_threads")  # main() in this process limits the BLAS pool


@pytest.fixture(scope="module")
def mixed(cifar10_dir, dpnet_cache_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("mixed")
    result = run_ok(*MIXED, "--data-dir", cifar10_dir, "--logdir", work / "logs", "--checkpoint-dir", work / "ck",
                    cwd=work, cache=dpnet_cache_dir)
    return result, work / "ck"


@pytest.mark.timeout(300)
def test_mixing_and_the_average_run_end_to_end(mixed):
    result, ckdir = mixed
    assert "MixUp alpha 0.2 and CutMix alpha 1 on 90% of the batches (CutMix on 50% of them)" in result.stdout
    assert "an average of the parameters with decay 0.8 (every 2 steps)" in result.stdout
    arrays, meta = checkpoint(ckdir / "last.npz")
    assert meta["config"]["mixup"] == 0.2 and meta["config"]["ema"] == 0.8 and meta["config"]["ema_every"] == 2
    assert len(meta["ema_val_acc_history"]) == len(meta["val_acc_history"]) == 4 and meta["ema_iteration"] == 30
    assert {key for key in arrays if key.startswith("ema/")} == {key.replace("param/", "ema/") for key in arrays
                                                                   if key.startswith("param/")}
    assert {"ema_norm/0/running_mean", "ema_norm/1/running_var"} <= set(arrays)
    scored = dict(live=meta["val_acc_history"], ema=meta["ema_val_acc_history"])[meta["best_source"]]
    assert meta["best_val_acc"] == max(meta["val_acc_history"] + meta["ema_val_acc_history"]) in scored
    assert ("the --ema average's" in result.stdout) == (meta["best_source"] == "ema")
    assert printed_accuracy(result) > 0.15  # chance is 0.1
    lines = re.findall(r"^epoch \d+/\d+: .*average's val acc (\d\.\d{4}),", result.stdout, flags=re.M)
    assert [float(v) for v in lines] == pytest.approx(meta["ema_val_acc_history"][1:], abs=5e-5)
    scalars = read_scalars(ckdir.parent / "logs")
    assert [v for _, v in scalars["accuracy/val_average"]] == pytest.approx(meta["ema_val_acc_history"][1:])


@pytest.mark.timeout(300)
def test_resume_after_sigkill_with_mixing_and_the_average_gives_the_uninterrupted_run(mixed, cifar10_dir,
                                                                                      dpnet_cache_dir, tmp_path):
    result, ckdir = mixed
    args = [*MIXED, "--data-dir", cifar10_dir, "--logdir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "ck"]
    killed = cli(*args, script=KILLER, cwd=tmp_path, cache=dpnet_cache_dir, KILL_AT_ITERATION="25")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = tmp_path / "ck" / "last.npz"
    assert checkpoint(last)[1]["epoch"] == 2
    resumed = run_ok("--resume", last, "--quiet", cwd=tmp_path, cache=dpnet_cache_dir)
    assert_same_state(ckdir / "last.npz", last)  # the average (ema/, ema_norm/) included
    for key in ("ema_val_acc_history", "ema_iteration", "best_source"):
        assert checkpoint(ckdir / "last.npz")[1][key] == checkpoint(last)[1][key], key
    assert printed_accuracy(resumed) == printed_accuracy(result)


@pytest.mark.timeout(300)
def test_two_processes_mix_and_average_what_one_does(mixed, cifar10_dir, dpnet_cache_dir, mpiexec, tmp_path):
    result, ckdir = mixed
    two = run_ok(*MIXED, "--data-dir", cifar10_dir, "--logdir", tmp_path / "logs", mpiexec=mpiexec, n=2,
                 cwd=tmp_path, cache=dpnet_cache_dir)
    assert_same_state(ckdir / "last.npz", tmp_path / "logs" / "last.npz", tol=1e-10)
    assert printed_accuracy(two) == printed_accuracy(result)


def _main(argv, capsys):
    return run_main(train.main, argv, capsys)


BAD = {
    "negative mixup": (["--mixup", "-0.2"], "--mixup must be an alpha >= 0 (0: off), got -0.2"),
    "cutmix nan": (["--cutmix", "nan"], "--cutmix must be a finite number, got nan"),
    "mix probability": (["--mix-probability", "1.5"], "--mix-probability must be a probability in [0, 1], got 1.5"),
    "cutmix probability": (["--cutmix-probability", "-1"], "--cutmix-probability must be a probability in [0, 1]"),
    "ema 1": (["--ema", "1"], "--ema must be a decay in (0, 1), or 0 (off), got 1.0"),
    "negative ema": (["--ema", "-0.5"], "--ema must be a decay in (0, 1), or 0 (off), got -0.5"),
    "ema every 0": (["--ema", "0.9", "--ema-every", "0"], "--ema-every must be a positive integer, got 0"),
    "ema not a number": (["--ema", "high"], "argument --ema: invalid float value: 'high'"),
    "mixing a hinge": (["--loss", "svm", "--label-smoothing", "0", "--cutmix", "1"],
                       "--cutmix 1.0 needs a loss that takes soft targets (softmax); the loss 'svm' does not"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_mixing_and_average_values_end_with_exit_code_2(case, tmp_path, monkeypatch, capsys):
    args, expected = BAD[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPNET_DATA_DIR", str(tmp_path / "no-data"))  # never download
    monkeypatch.setenv("DPNET_CACHE_DIR", str(tmp_path / "cache"))
    before = set(tmp_path.rglob("*"))
    code, err = _main([*args, "--logdir", tmp_path / "logs"], capsys)
    assert code == 2 and expected in err, err
    assert len(re.findall("error", err)) == 1 and "Traceback" not in err, err
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "cache"}


def test_a_plugin_model_without_soft_targets_is_refused_with_mixing():
    class Plain:
        params = {"W": np.zeros(2)}

        def loss(self, X, y=None):
            raise AssertionError("never called")

    config = {**train.DEFAULTS, "mixup": 0.2, "test_flips": False}
    original = train._build_model
    try:
        train._build_model = lambda config: Plain()
        with pytest.raises(train.UsageError, match=r"--mixup 0.2 needs a model whose loss takes soft targets "
                                                   r"\(model.soft_targets"):
            train.build_model(config)
        assert isinstance(train.build_model({**config, "mixup": 0.0}), Plain)
    finally:
        train._build_model = original
