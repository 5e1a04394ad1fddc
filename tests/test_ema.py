"""The average of the parameters (dpnet.ema, Solver(ema_decay=, ema_every=)): its values, the best of the live and the
averaged parameters, checkpoints and exact resume. N processes against one: tests/test_mixing.py (its "ema" cases)."""

import json
import zipfile

import numpy as np
import pytest

from dpnet.checkpoint import CheckpointError, load_checkpoint, restore_checkpoint, save_checkpoint
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.ema import ExponentialAverage
from dpnet.mixing import Mixing
from dpnet.monitor import CheckpointMonitor
from dpnet.solver import Solver


def _blobs(n, seed, num_classes=3, shape=(2, 2, 3)):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((num_classes, int(np.prod(shape)))) * 3
    y = rng.integers(num_classes, size=n)
    return (centres[y] + rng.standard_normal((n, int(np.prod(shape))))).reshape(n, *shape), y


@pytest.fixture
def data():
    (X_train, y_train), (X_val, y_val) = _blobs(300, 0), _blobs(60, 1)
    return dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val)


def _model(**kwargs):
    kwargs = {"input_dim": 12, "num_classes": 3, "weight_scale": 0.1, "seed": 0, "dtype": np.float64, **kwargs}
    return FullyConnectedNet([16], **kwargs)


class _States:
    """Copies of the parameters and running statistics after every step."""

    def __init__(self):
        self.states = []

    def on_iteration_end(self, solver, info):
        state = {f"param/{k}": v.copy() for k, v in solver.model.params.items()}
        state.update({f"norm/{i}/{k}": p[k].copy() for i, p in enumerate(solver.model.bn_params)
                      for k in ("running_mean", "running_var")})
        self.states.append(state)


@pytest.mark.parametrize("every", [1, 3])
def test_the_average_is_the_hand_computed_one(data, every):
    """decay**m * a + (1 - decay**m) * w at every `every`-th step and at every evaluation (steps 1, 10, 20), from the
    starting parameters; running statistics alike."""
    model = _model(normalization="batchnorm")
    start = {f"param/{k}": v.copy() for k, v in model.params.items()}
    start.update({f"norm/{i}/{k}": p[k].copy() for i, p in enumerate(model.bn_params)
                  for k in ("running_mean", "running_var")})
    states = _States()
    solver = Solver(model, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=30,
                    num_epochs=2, seed=1, verbose=False, monitors=[states], ema_decay=0.8, ema_every=every)
    solver.train()
    average, last = dict(start), 0
    for t, state in enumerate(states.states, start=1):
        if t % every == 0 or t in (1, 10, 20):
            decay = 0.8 ** (t - last)
            average = {k: decay * a + (1 - decay) * state[k] for k, a in average.items()}
            last = t
    assert solver.ema.iteration == 20 and solver.ema.arrays.keys() == average.keys()
    for key, value in average.items():
        np.testing.assert_allclose(solver.ema.arrays[key], value, rtol=1e-13, atol=1e-15, err_msg=key)
    assert len(solver.ema_val_acc_history) == len(solver.val_acc_history) == 3
    solver.use_params("ema")
    for key, value in solver.ema.arrays.items():
        name = key.split("/", 1)[1]
        held = model.params[name] if key.startswith("param/") else model.bn_params[int(name[0])][name[2:]]
        np.testing.assert_array_equal(held, value)
        assert held is not value  # a copy: training on would not change the average


def test_the_checkpoint_monitor_writes_best_npz_when_the_average_is_the_best(data, tmp_path):
    solver = Solver(_model(), data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=30,
                    num_epochs=1, seed=1, verbose=False, ema_decay=0.9)
    solver.train()
    # As an evaluation that found the average best leaves it: its arrays kept as the best, the live ones elsewhere.
    solver.best_source = "ema"
    solver.best_params = {name: solver.ema.arrays[f"param/{name}"].copy() for name in solver.model.params}
    assert not all(np.array_equal(solver.best_params[k], v) for k, v in solver.model.params.items())
    CheckpointMonitor(tmp_path, every=0).on_epoch_end(solver, {})  # not the last epoch's: only a best is due
    best_arrays, _ = load_checkpoint(tmp_path / "best.npz")
    for name, value in solver.best_params.items():
        np.testing.assert_array_equal(best_arrays[f"best/{name}"], value)


def test_folding_keeps_the_dtype_and_starts_new_arrays():
    average = ExponentialAverage(0.5)
    w = np.ones(70_000, dtype=np.float32)  # more than one chunk
    average.fold({"param/w": w}, 0)
    average.fold({"param/w": 3 * w, "norm/0/running_mean": np.full(2, 7.0)}, 1)
    assert average.arrays["param/w"].dtype == np.float32 and np.all(average.arrays["param/w"] == 2)
    np.testing.assert_array_equal(average.arrays["norm/0/running_mean"], [7.0, 7.0])
    average.fold({"param/w": 3 * w}, 1)  # the same step again: nothing
    assert np.all(average.arrays["param/w"] == 2) and not average.due(1) and average.due(2)
    for kwargs in (dict(decay=1.0), dict(decay=0), dict(decay=True), dict(decay=0.9, every=0),
                   dict(decay=0.9, every=1.5)):
        with pytest.raises(ValueError, match="ema_decay must be a number in|ema_every must be a positive"):
            ExponentialAverage(**kwargs)


class _Recording(Solver):
    """A Solver keeping a copy of the average at every evaluation."""

    def _evaluate(self):
        super()._evaluate()
        self.snapshots = getattr(self, "snapshots", []) + [{k: v.copy() for k, v in self.ema.arrays.items()}]


def test_the_best_parameters_are_the_best_of_the_live_and_the_averaged_ones(data):
    """An update rule that throws the trained parameters far away at every step: their average stays close to where
    training started and wins; the kept best are the average's arrays at that evaluation."""
    trained = _model(normalization="batchnorm")
    Solver(trained, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=30,
           num_epochs=3, seed=1, verbose=False).train()
    noise = np.random.default_rng(7)

    def scatter(w, dw, config=None):
        return w + 3 * noise.standard_normal(w.shape), config

    model = _model(normalization="batchnorm")
    model.params.update({k: v.copy() for k, v in trained.params.items()})
    for ours, theirs in zip(model.bn_params, trained.bn_params):
        ours.update({k: v.copy() for k, v in theirs.items() if isinstance(v, np.ndarray)})
    solver = _Recording(model, data, update_rule=scatter, batch_size=30, num_epochs=2, seed=1, verbose=False,
                        ema_decay=0.99)
    solver.train()
    assert solver.best_source == "ema"
    assert solver.best_val_acc == max(solver.ema_val_acc_history) > max(solver.val_acc_history)
    best = solver.ema_val_acc_history.index(solver.best_val_acc)
    for name, value in model.params.items():  # train() ends holding the best: the average's at that evaluation
        np.testing.assert_array_equal(value, solver.snapshots[best][f"param/{name}"])
    for i, param in enumerate(model.bn_params):
        np.testing.assert_array_equal(param["running_mean"], solver.snapshots[best][f"norm/{i}/running_mean"])

    plain = Solver(_model(), data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05},
                   batch_size=30, num_epochs=2, seed=1, verbose=False, ema_decay=0.999)
    plain.train()  # an average that barely leaves the random start: the live parameters win
    assert plain.best_source == "live" and plain.best_val_acc == max(plain.val_acc_history)
    assert max(plain.ema_val_acc_history) < plain.best_val_acc


@pytest.mark.parametrize("every, mixing", [(1, None), (3, Mixing(mixup=0.4, cutmix=1.0, probability=0.7))])
def test_checkpoint_resume_with_an_average_is_exact(data, tmp_path, every, mixing):
    """Stopping after epoch 2 and resuming gives bit for bit what the uninterrupted run gives: the parameters, the
    average, its accuracies and where the best came from."""
    def fresh():
        model = _model(normalization="batchnorm", dropout=0.9)
        return Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=32,
                      num_epochs=4, seed=3, lr_decay=0.9, verbose=False, ema_decay=0.7, ema_every=every,
                      mixing=mixing)

    full = fresh().train()
    path = save_checkpoint(tmp_path / "run.npz", _run_until_epoch(fresh(), 2))
    resumed = fresh()
    restore_checkpoint(resumed, path)
    assert resumed.ema.iteration == 18 and resumed.ema.arrays.keys() == full.ema.arrays.keys()
    resumed.train()
    for name in full.model.params:
        np.testing.assert_array_equal(resumed.model.params[name], full.model.params[name])
    for key, value in full.ema.arrays.items():
        np.testing.assert_array_equal(resumed.ema.arrays[key], value, err_msg=key)
    assert resumed.loss_history == full.loss_history
    assert resumed.ema_val_acc_history == full.ema_val_acc_history
    assert resumed.val_acc_history == full.val_acc_history
    assert (resumed.best_source, resumed.best_val_acc) == (full.best_source, full.best_val_acc)


def _run_until_epoch(solver, stop_epoch):
    class Stop(Exception):
        pass

    class StopAfter:
        def on_epoch_end(self, s, info):
            assert "ema_val_acc" in info
            if info["epoch"] == stop_epoch:
                raise Stop

    solver.monitors.append(StopAfter())
    with pytest.raises(Stop):
        solver.train()
    solver.monitors.clear()
    return solver


def test_checkpoints_without_an_average_still_load_and_start_one(data, tmp_path):
    def solver(**kwargs):
        return Solver(_model(), data, batch_size=30, num_epochs=2, seed=2, verbose=False,
                      optim_config={"learning_rate": 0.05}, **kwargs)

    old = solver()
    old.train()
    path = save_checkpoint(tmp_path / "old.npz", old)
    averaged = solver(ema_decay=0.9)
    restore_checkpoint(averaged, path)
    assert averaged.ema.arrays == {} and averaged.best_source == "live" and averaged.ema_val_acc_history == []
    averaged.num_epochs = 3
    averaged.train()  # the average starts from the restored parameters
    assert averaged.ema.iteration == 30 and len(averaged.ema_val_acc_history) == 1
    # ... and a checkpoint with an average into a Solver that keeps none: the average is left aside
    path = save_checkpoint(tmp_path / "new.npz", averaged)
    plain = solver()
    restore_checkpoint(plain, path)
    assert plain.ema is None and plain.iteration == 30


def _rewrite(path, target, change):
    """Copy the checkpoint at path to target with change(members: dict name -> bytes) applied."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    change(members)
    with zipfile.ZipFile(target, "w") as archive:
        for name, value in members.items():
            archive.writestr(name, value)
    return target


def _set_meta(**fields):
    def change(members):
        import io

        meta = json.loads(str(np.load(io.BytesIO(members["meta.npy"]))[()]))
        meta.update(fields)
        buffer = io.BytesIO()
        np.save(buffer, np.array(json.dumps(meta)))
        members["meta.npy"] = buffer.getvalue()
    return change


def _drop(prefix):
    def change(members):
        for name in [n for n in members if n.startswith(prefix)][:1]:
            del members[name]
    return change


@pytest.mark.parametrize("change, match", [
    (_set_meta(best_source="ema", ema_val_acc_history=[]), "best_source must be"),
    (_set_meta(best_source="both"), "best_source must be"),
    (_set_meta(ema_iteration=10 ** 6), r"ema_iteration must be an integer in \[0, 20\]"),
    (_set_meta(ema_val_acc_history=[0.5, 2.0, 0.5]), "ema_val_acc_history must be a list"),
    (_set_meta(best_val_acc=0.123), "none of the validation accuracies"),
    (_drop("ema/"), r"its average of the parameters \(ema/, ema_norm/\) is not the whole state"),
])
def test_a_bad_average_in_a_checkpoint_is_refused(data, tmp_path, change, match):
    solver = Solver(_model(normalization="batchnorm"), data, batch_size=30, num_epochs=2, seed=2, verbose=False,
                    ema_decay=0.9)
    solver.train()
    path = _rewrite(save_checkpoint(tmp_path / "good.npz", solver), tmp_path / "bad.npz", change)
    fresh = Solver(_model(normalization="batchnorm"), data, batch_size=30, num_epochs=2, verbose=False,
                   ema_decay=0.9)
    with pytest.raises(CheckpointError, match=match):
        restore_checkpoint(fresh, path)


def test_a_best_from_the_average_is_a_valid_checkpoint(data, tmp_path):
    """best_val_acc may be an accuracy of the average only."""
    solver = Solver(_model(), data, batch_size=30, num_epochs=2, seed=2, verbose=False, ema_decay=0.9)
    solver.train()
    solver.best_val_acc, solver.best_source = 0.5, "ema"
    solver.ema_val_acc_history[-1] = 0.5
    path = save_checkpoint(tmp_path / "run.npz", solver)
    fresh = Solver(_model(), data, batch_size=30, num_epochs=2, verbose=False, ema_decay=0.9)
    restore_checkpoint(fresh, path)
    assert (fresh.best_source, fresh.best_val_acc) == ("ema", 0.5)
