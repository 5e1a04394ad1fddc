"""dpnet.monitor on a toy problem (no CIFAR-10): TensorBoard events read back, checkpoints, progress lines, plots."""

import io
import os

import numpy as np
import pytest
from requirements import require_module

from dpnet.checkpoint import load_checkpoint
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.monitor import (CheckpointMonitor, Monitor, ProgressMonitor, TensorBoardMonitor, read_events, read_scalars,
                           save_curves)
from dpnet.solver import Solver


def _blobs(n, seed, num_classes=3, dim=12):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((num_classes, dim)) * 3
    y = rng.integers(num_classes, size=n)
    return centres[y] + rng.standard_normal((n, dim)), y


def _solver(monitors, num_epochs=3, **kwargs):
    kwargs = {"update_rule": "adam", "optim_config": {"learning_rate": 1e-2}, **kwargs}
    X_train, y_train = _blobs(200, 0)
    X_val, y_val = _blobs(50, 1)
    model = FullyConnectedNet([16], input_dim=12, num_classes=3, weight_scale=0.1, seed=0, dtype=np.float64,
                              normalization="batchnorm")
    data = dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val)
    return Solver(model, data, batch_size=50, num_epochs=num_epochs, seed=0, verbose=False, monitors=monitors,
                  **kwargs)


def test_tensorboard_monitor_logs_scalars_histograms_and_hparams(tmp_path):
    tb = TensorBoardMonitor(tmp_path, config_text="lr = 0.01", log_every=1)
    solver = _solver([tb]).train()
    tb.write_hparams({"lr": 0.01, "hidden_dims": "16"}, {"hparam/test_accuracy": 0.5}, solver.iteration)
    tb.close()

    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], solver.loss_history, rtol=1e-6)
    assert [s for s, _ in scalars["accuracy/val"]] == [4, 8, 12]
    np.testing.assert_allclose([v for _, v in scalars["accuracy/val"]], solver.val_acc_history[1:], rtol=1e-6)
    assert scalars["hparam/test_accuracy"] == [(12, 0.5)]
    histograms, tags = {}, set()
    for event in read_events(tmp_path):
        for value in event.summary.value:
            tags.add(value.tag)
            if value.HasField("histo"):
                histograms.setdefault(value.tag, []).append((event.step, value.histo.num))
    for name, param in solver.model.params.items():
        assert histograms[f"weights/{name}"] == [(4, param.size), (8, param.size), (12, param.size)]
        assert histograms[f"gradients/{name}"] == [(4, param.size), (8, param.size), (12, param.size)]
    assert {"config/text_summary", "_hparams_/experiment", "_hparams_/session_start_info"} <= tags
    assert "loss" not in vars(solver.model)  # the gradient capture is undone at the end


def test_scalars_every_log_every_iterations_and_the_norm_only_then(tmp_path):
    norms_computed = []

    class Spy:  # reads what the TensorBoard monitor has read: grad_norm is in info only once someone asked for it
        def on_iteration_end(self, solver, info):
            norms_computed.append("grad_norm" in info.keys())

    tb = TensorBoardMonitor(tmp_path, log_every=5)
    solver = _solver([tb, Spy()]).train()
    tb.close()
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 5, 10]
    assert [s for s, _ in scalars["train/grad_norm"]] == [1, 5, 10]
    assert norms_computed == [t in (1, 5, 10) for t in range(1, solver.iteration + 1)]
    with pytest.raises(ValueError, match="log_every"):
        TensorBoardMonitor(tmp_path, log_every=0)


def test_the_gradients_logged_are_those_of_the_last_update(tmp_path):
    class Check(Monitor):
        def on_iteration_end(self, solver, info):
            if info["iteration"] == solver.iterations_per_epoch - 1:
                self.before = {k: v.copy() for k, v in solver.model.params.items()}

        def on_epoch_end(self, solver, info):
            self.step = {k: self.before[k] - v for k, v in solver.model.params.items()}
            self.grads = dict(tb._grads)

    tb, check = TensorBoardMonitor(tmp_path), Check()
    _solver([tb, check], num_epochs=1, update_rule="sgd", optim_config={"learning_rate": 0.1}).train()
    assert set(check.grads) == set(check.step)
    for name, step in check.step.items():  # plain SGD: w_before - w_after = lr * grad
        np.testing.assert_allclose(step, 0.1 * check.grads[name], rtol=1e-10, atol=1e-14)


def test_a_resumed_run_hides_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    first = TensorBoardMonitor(tmp_path)
    for step in range(1, 6):
        first.scalar("train/loss", 10.0 + step, step)
    first.close()
    second = TensorBoardMonitor(tmp_path, purge_step=3)
    for step in range(3, 5):
        second.scalar("train/loss", 20.0 + step, step)
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path)["train/loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]


def test_checkpoint_monitor_writes_last_every_k_epochs_and_the_best(tmp_path):
    written = []

    class Spy(CheckpointMonitor):
        def on_epoch_end(self, solver, info):
            before = {p: os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in (self.last_path,)}
            super().on_epoch_end(solver, info)
            if os.path.exists(self.last_path) and os.stat(self.last_path).st_mtime_ns != before[self.last_path]:
                written.append(solver.epoch)

    solver = _solver([Spy(tmp_path, every=2, config={"note": "x"})], num_epochs=5).train()
    assert written == [2, 4, 5]
    arrays, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["epoch"] == 5 and meta["config"] == {"note": "x"}
    best_arrays, best_meta = load_checkpoint(tmp_path / "best.npz")
    assert best_meta["val_acc_history"][-1] == solver.best_val_acc
    for name, value in solver.model.params.items():  # train() ends with the best parameters
        np.testing.assert_array_equal(best_arrays[f"param/{name}"], value)
        np.testing.assert_array_equal(arrays[f"best/{name}"], value)


def test_checkpoint_monitor_never_writes_non_finite_parameters(tmp_path):
    monitor = CheckpointMonitor(tmp_path)
    solver = _solver([monitor], num_epochs=1).train()
    before = (tmp_path / "last.npz").read_bytes()
    solver.model.params["W1"][0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="W1 are not finite at iteration 4"):
        monitor.on_epoch_end(solver, {})
    assert (tmp_path / "last.npz").read_bytes() == before


def test_progress_monitor_prints_one_line_per_epoch_unless_quiet():
    out = io.StringIO()
    _solver([ProgressMonitor(stream=out, bar=False)]).train()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train acc" in line and "val acc" in line and "samples/s" in line for line in lines)
    quiet = io.StringIO()
    _solver([ProgressMonitor(quiet=True, stream=quiet)]).train()
    assert quiet.getvalue() == ""


def test_save_curves_writes_a_png(tmp_path):
    require_module("matplotlib", "pip install 'dpnet[plot]'")
    path = save_curves(tmp_path / "curves.png", [2.3, 2.0, 1.5], [0.1, 0.3], [0.1, 0.25])
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
