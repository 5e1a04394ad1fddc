"""The Solver in one process: the loop, its bookkeeping, reproducibility, checkpoints and its errors."""

import numpy as np
import pytest

from dpnet.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.solver import Solver


def _blobs(n, seed, num_classes=3, shape=(2, 2, 3)):
    """Linearly separable classes: each class a Gaussian blob around its own centre."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((num_classes, int(np.prod(shape)))) * 3
    y = rng.integers(num_classes, size=n)
    X = centres[y] + rng.standard_normal((n, int(np.prod(shape))))
    return X.reshape(n, *shape), y


@pytest.fixture
def data():
    X_train, y_train = _blobs(300, 0)
    X_val, y_val = _blobs(60, 1)
    return dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val)


def _model(**kwargs):
    kwargs = {"input_dim": 12, "num_classes": 3, "weight_scale": 0.1, "seed": 0, "dtype": np.float64, **kwargs}
    return FullyConnectedNet([16], **kwargs)


def test_training_learns_and_keeps_the_best_parameters(data):
    model = _model()
    solver = Solver(model, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05},
                    batch_size=30, num_epochs=4, seed=1, verbose=False)
    solver.train()
    assert len(solver.loss_history) == 4 * 10
    assert len(solver.val_acc_history) == len(solver.train_acc_history) == 1 + 4  # first iteration + each epoch
    assert solver.loss_history[-1] < solver.loss_history[0] / 3
    assert solver.best_val_acc == max(solver.val_acc_history) > 0.9
    for name, value in solver.best_params.items():
        np.testing.assert_array_equal(model.params[name], value)


def test_a_new_best_is_copied_into_the_arrays_kept_for_the_best(data):
    """No parameter-sized allocation at each new best: the same arrays hold it, and hold the best one at the end."""
    snapshots = []

    class Watch:
        def on_epoch_end(self, solver, info):
            snapshots.append((info["val_acc"], {k: v.copy() for k, v in solver.model.params.items()},
                              dict(solver.best_params)))

    solver = Solver(_model(), data, update_rule="sgd", optim_config={"learning_rate": 0.02}, batch_size=30,
                    num_epochs=4, seed=1, verbose=False, monitors=[Watch()])
    solver.train()
    improvements = [i for i in range(1, 4) if snapshots[i][0] > max(s[0] for s in snapshots[:i])]
    assert improvements and snapshots[0][0] < solver.best_val_acc  # a later epoch improved on the first
    kept = snapshots[0][2]
    assert all(solver.best_params[k] is kept[k] for k in kept) and kept.keys() == solver.model.params.keys()
    best = max(range(4), key=lambda i: (snapshots[i][0], -i))  # the first epoch with the highest accuracy
    for name, value in snapshots[best][1].items():
        np.testing.assert_array_equal(solver.best_params[name], value)
        assert not np.array_equal(snapshots[0][1][name], value)  # not the first epoch's


def test_same_seed_same_run_different_seed_different_run(data):
    def run(seed):
        solver = Solver(_model(dropout=0.8), data, batch_size=32, num_epochs=2, seed=seed, verbose=False,
                        optim_config={"learning_rate": 0.1})
        return solver.train().loss_history

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_learning_rate_decays_per_epoch(data):
    solver = Solver(_model(), data, optim_config={"learning_rate": 0.1}, lr_decay=0.5, batch_size=100,
                    num_epochs=3, verbose=False)
    solver.train()
    assert solver.learning_rate == pytest.approx(0.1 * 0.5**3)


def test_callable_update_rule(data):
    calls = []

    def halve(w, dw, config=None):
        calls.append(config)
        return w * 0.5, config

    model = _model()
    w0 = model.params["W1"].copy()
    Solver(model, data, update_rule=halve, batch_size=300, num_epochs=1, verbose=False)._step()
    np.testing.assert_array_equal(model.params["W1"], w0 * 0.5)
    assert len(calls) == len(model.params)


def test_prints_in_the_seed_format(data, capsys):
    Solver(_model(), data, batch_size=30, num_epochs=2, print_every=10, verbose=True).train()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("(Epoch 0 / 2) (Iteration 1 / 20) loss: ")
    assert "train acc: " in lines[0] and "val_acc: " in lines[0]
    assert lines[1].startswith("(Epoch 1 / 2) (Iteration 11 / 20) loss: ")
    assert len(lines) == 2


def test_check_accuracy_subsample_and_batches(data):
    solver = Solver(_model(), data, verbose=False)
    full = solver.check_accuracy(data["X_val"], data["y_val"], batch_size=7)
    assert full == solver.check_accuracy(data["X_val"], data["y_val"], batch_size=100)
    part = solver.check_accuracy(data["X_val"], data["y_val"], num_samples=20)
    assert part in {k / 20 for k in range(21)}


def test_unknown_keyword_and_rule_are_named(data):
    with pytest.raises(TypeError, match="learning_rat"):
        Solver(_model(), data, learning_rat=1e-3)
    with pytest.raises(ValueError, match="sgd_momentun"):
        Solver(_model(), data, update_rule="sgd_momentun")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(X_train=d["X_train"][:0], y_train=d["y_train"][:0]), "empty"),
    (lambda d: d.update(y_train=d["y_train"][:-1]), "y_train"),
    (lambda d: d.update(y_val=d["y_val"].astype(float)), "integer"),
    (lambda d: d["y_train"].__setitem__(0, 3), r"labels in \[0, 3\]"),
    (lambda d: d["X_train"].__setitem__((5, 0, 0, 0), np.nan), "NaN or inf"),
    (lambda d: d["X_val"].__setitem__((5, 0, 0, 0), -np.inf), "NaN or inf"),
])
def test_bad_data_is_named(data, change, match):
    change(data)
    with pytest.raises(ValueError, match=match):
        Solver(_model(), data)


@pytest.mark.parametrize("batch_size", [0, -5])
def test_non_positive_batch_size(data, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        Solver(_model(), data, batch_size=batch_size)


def test_diverging_loss_stops_with_the_iteration(data):
    solver = Solver(_model(), data, optim_config={"learning_rate": 1e30}, batch_size=30, verbose=False)
    with pytest.raises(FloatingPointError, match=r"iteration \d+"):
        solver.train()


@pytest.mark.parametrize("rule", ["sgd_momentum", "adam", "rmsprop"])
def test_checkpoint_resume_is_exact(data, tmp_path, rule):
    """Stopping after epoch 2 and resuming gives bit for bit what the uninterrupted run gives."""
    def fresh():
        model = _model(normalization="batchnorm", dropout=0.9)
        return Solver(model, data, update_rule=rule, optim_config={"learning_rate": 1e-2}, batch_size=32,
                      num_epochs=4, seed=3, lr_decay=0.9, verbose=False)

    full = fresh().train()
    path = save_checkpoint(tmp_path / "run.npz", _run_until_epoch(fresh(), 2))
    resumed = fresh()
    restore_checkpoint(resumed, path)
    resumed.train()
    for name in full.model.params:
        np.testing.assert_array_equal(resumed.model.params[name], full.model.params[name])
    assert resumed.loss_history == full.loss_history
    assert resumed.val_acc_history == full.val_acc_history
    # the normalization state too: the running statistics the model evaluates with, and those kept with the best
    for name, value in full.best_norm_state.items():
        np.testing.assert_array_equal(resumed.best_norm_state[name], value, err_msg=name)
    for ours, theirs in zip(resumed.model.bn_params, full.model.bn_params):
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    resumed.use_params("final"), full.use_params("final")
    for ours, theirs in zip(resumed.model.bn_params, full.model.bn_params):
        np.testing.assert_array_equal(ours["running_var"], theirs["running_var"])


def _run_until_epoch(solver, stop_epoch):
    """Train `solver` (configured for more epochs) and stop it dead at the end of epoch `stop_epoch`."""
    class Stop(Exception):
        pass

    class StopAfter:
        def on_epoch_end(self, s, info):
            if info["epoch"] == stop_epoch:
                raise Stop

    solver.monitors.append(StopAfter())
    with pytest.raises(Stop):
        solver.train()
    solver.monitors.clear()
    return solver


def test_checkpoint_mismatch_is_refused_with_the_difference(data, tmp_path):
    solver = Solver(_model(), data, verbose=False)
    path = save_checkpoint(tmp_path / "a.npz", solver)
    other = Solver(FullyConnectedNet([17], input_dim=12, num_classes=3, dtype=np.float64), data, verbose=False)
    with pytest.raises(CheckpointError, match=r"W1 is float64\[12, 16\] in the checkpoint but float64\[12, 17\]"):
        restore_checkpoint(other, path)
    deeper = Solver(FullyConnectedNet([16, 4], input_dim=12, num_classes=3, dtype=np.float64), data, verbose=False)
    with pytest.raises(CheckpointError, match="W3 is in the model but not in the checkpoint"):
        restore_checkpoint(deeper, path)


def test_checkpoint_files_that_are_not_checkpoints(data, tmp_path):
    solver = Solver(_model(), data, verbose=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_checkpoint(solver, tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="garbage.npz is not a readable dpnet checkpoint: not an .npz archive"):
        restore_checkpoint(solver, garbage)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")  # NumPy alone would say that it holds pickled data
    with pytest.raises(CheckpointError, match=r"notes.txt is not a readable dpnet checkpoint: not an .npz archive, or"):
        restore_checkpoint(solver, text)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled.npz"):
        restore_checkpoint(solver, pickled)
    good = save_checkpoint(tmp_path / "good.npz", solver)
    truncated = tmp_path / "truncated.npz"
    with open(good, "rb") as f:
        truncated.write_bytes(f.read()[:200])
    with pytest.raises(CheckpointError, match="truncated.npz"):
        restore_checkpoint(solver, truncated)


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    solver = Solver(_model(), data, verbose=False)
    path = tmp_path / "run.npz"
    save_checkpoint(path, solver)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, solver)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]  # no temporary file left behind


def test_checkpoints_get_the_permissions_of_an_ordinary_file(data, tmp_path):
    import os

    previous = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "run.npz", Solver(_model(), data, verbose=False))
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o640  # 0666 less the umask, as open() would make it (not 0600)


def test_checkpoint_name_writes_one_file_per_epoch(data, tmp_path):
    Solver(_model(), data, batch_size=100, num_epochs=2, checkpoint_name=str(tmp_path / "ck"), verbose=False).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck_epoch_1.npz", "ck_epoch_2.npz"]


def test_augmentation_changes_batches_reproducibly(data):
    from dpnet.augment import Augmentation

    def run(augment, seed=0):
        solver = Solver(_model(), data, batch_size=30, num_epochs=1, seed=seed, verbose=False, augment=augment,
                        optim_config={"learning_rate": 0.05})
        return solver.train().loss_history

    plain, augmented = run(None), run(Augmentation(crop_padding=1))
    assert plain != augmented
    assert augmented == run(Augmentation(crop_padding=1))


def test_augmentation_needs_images(data):
    from dpnet.augment import Augmentation

    flat = dict(data, X_train=data["X_train"].reshape(300, -1), X_val=data["X_val"].reshape(60, -1))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Solver(_model(), flat, augment=Augmentation())


def test_lr_schedule_sets_the_rate_of_every_iteration(data):
    from dpnet.schedules import make_schedule

    schedule = make_schedule("cosine", total_iterations=20, warmup_iterations=4)
    seen = []

    class Watch:
        def on_iteration_end(self, solver, info):
            seen.append(info["learning_rate"])

    Solver(_model(), data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.1}, lr_schedule=schedule,
           batch_size=30, num_epochs=2, monitors=[Watch()], verbose=False).train()
    assert seen == pytest.approx([0.1 * schedule(t) for t in range(20)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_schedule=lambda t: 1.0, lr_decay=0.9, optim_config={"learning_rate": 0.1}), "not both"),
    (dict(lr_schedule=lambda t: 1.0), "learning_rate"),
    (dict(weight_decay=-1), "weight_decay"),
])
def test_recipe_errors(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Solver(_model(), data, **kwargs)


def test_decoupled_weight_decay_shrinks_weights_only(data):
    def still(w, dw, config=None):
        config = {} if config is None else config
        config.setdefault("learning_rate", 0.1)
        return w.copy(), config

    model = _model(normalization="batchnorm")
    model.params["b1"] += 1.0
    before = {k: v.copy() for k, v in model.params.items()}
    Solver(model, data, update_rule=still, weight_decay=0.5, batch_size=300, num_epochs=1, verbose=False)._step()
    for name, value in model.params.items():
        expected = before[name] * (1 - 0.1 * 0.5) if value.ndim >= 2 else before[name]
        np.testing.assert_allclose(value, expected, rtol=1e-15, err_msg=name)

    def no_rate(w, dw, config=None):
        return w.copy(), {}

    with pytest.raises(ValueError, match="no 'learning_rate'"):
        Solver(_model(), data, update_rule=no_rate, weight_decay=0.5, verbose=False)._step()


def test_final_params_are_the_last_state(data):
    solver = Solver(_model(), data, optim_config={"learning_rate": 0.05}, batch_size=30, num_epochs=2,
                    verbose=False)
    last = {}

    class Keep:
        def on_epoch_end(self, s, info):
            last.update({k: v.copy() for k, v in s.model.params.items()})

    solver.monitors.append(Keep())
    solver.train()
    for name in last:
        np.testing.assert_array_equal(solver.final_params[name], last[name])


def test_best_and_final_carry_their_normalization_state(data, tmp_path):
    solver = Solver(_model(normalization="batchnorm"), data, optim_config={"learning_rate": 0.05}, batch_size=30,
                    num_epochs=3, verbose=False, seed=0)
    solver.train()
    bn = solver.model.bn_params[0]
    np.testing.assert_array_equal(bn["running_mean"], solver.best_norm_state["0/running_mean"])
    solver.use_params("final")
    np.testing.assert_array_equal(bn["running_mean"], solver.final_norm_state["0/running_mean"])
    np.testing.assert_array_equal(solver.model.params["W1"], solver.final_params["W1"])
    path = save_checkpoint(tmp_path / "ck.npz", solver)
    other = Solver(_model(normalization="batchnorm"), data, verbose=False)
    restore_checkpoint(other, path)
    for name, value in solver.best_norm_state.items():
        np.testing.assert_array_equal(other.best_norm_state[name], value)


def test_a_monitor_can_stop_training(data):
    class StopAt:
        def on_iteration_end(self, solver, info):
            if info["iteration"] == 7:
                solver.stop()

    solver = Solver(_model(), data, batch_size=30, num_epochs=5, monitors=[StopAt()], verbose=False)
    solver.train()
    assert solver.iteration == 7 and len(solver.loss_history) == 7
    assert solver.best_params  # the first iteration was evaluated; train() ended normally


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "rmsprop", "adam"])
def test_in_place_updates_give_what_the_pure_rule_gives(data, rule):
    """The Solver updates its own parameters with the rule's in-place variant; a callable wrapping the pure rule (no
    in-place variant) takes the pure path: the two runs agree bit for bit (and within rounding with weight decay,
    which the in-place path applies before the step; compared without batchnorm, whose preceding biases are rounding
    noise that adam and rmsprop scale up to full steps)."""
    from dpnet import registry

    pure_rule = registry.get_update_rule(rule)

    def pure(w, dw, config=None):
        return pure_rule(w, dw, config)

    def run(update_rule, weight_decay=0.0, normalization="batchnorm"):
        model = _model(normalization=normalization, dropout=0.9)
        solver = Solver(model, data, update_rule=update_rule, optim_config={"learning_rate": 1e-2}, batch_size=32,
                        num_epochs=2, seed=3, verbose=False, weight_decay=weight_decay)
        assert (solver._update.in_place is not None) == (update_rule == rule)
        solver.train()
        solver.use_params("final")
        return model.params

    for name, value in run(rule).items():
        np.testing.assert_array_equal(value, run(pure)[name], err_msg=name)
    decayed, reference = run(rule, 0.5, None), run(pure, 0.5, None)
    for name, value in decayed.items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_parameters_are_updated_in_place_but_arrays_held_elsewhere_never_change(data):
    model = _model()
    initial = dict(model.params)
    snapshot = {name: value.copy() for name, value in initial.items()}
    solver = Solver(model, data, update_rule="adam", batch_size=30, num_epochs=1, verbose=False)
    solver._step()
    mine = dict(model.params)
    for name, value in initial.items():
        assert mine[name] is not value  # the first update worked on a copy
        np.testing.assert_array_equal(value, snapshot[name], err_msg=name)
    solver._step()
    solver._step()
    assert all(model.params[name] is mine[name] for name in mine)  # then in place: nothing reallocated
    replaced = model.params["W1"] = model.params["W1"].copy()  # a user's array put in the model
    kept = replaced.copy()
    solver._step()
    np.testing.assert_array_equal(replaced, kept)
    assert model.params["W1"] is not replaced


def test_the_solver_keeps_no_parameter_array_the_model_dropped(data):
    import gc
    import weakref

    model = _model()
    solver = Solver(model, data, update_rule="sgd_momentum", batch_size=30, num_epochs=1, verbose=False)
    solver._step()
    trained = [weakref.ref(model.params[name]) for name in model.params]  # the solver's own arrays
    model.params = {name: value.copy() for name, value in model.params.items()}  # as use_params does
    gc.collect()
    assert all(ref() is None for ref in trained)


def test_gradients_go_straight_into_one_reused_buffer(data):
    """A model whose loss takes `grads` writes into views of the Solver's buffer: after warm-up a step allocates no
    gradient (traced by tracemalloc, which sees NumPy's allocations: the peak is lower than with a model that returns
    new arrays by the gradients' size), and the gradients handed to monitors are those views."""
    import tracemalloc

    wide = {**data, "X_train": np.repeat(data["X_train"].reshape(300, -1), 250, axis=1)}  # 3000 features
    wide["X_val"] = wide["X_train"][:60]
    model = FullyConnectedNet([50], input_dim=3000, num_classes=3, weight_scale=0.1, seed=0, dtype=np.float64)

    class PlainModel:  # a model without the keyword gets its own arrays, as before
        params = model.params

        def loss(self, X, y=None):
            return model.loss(X, y)

    def traced_step(solver):
        solver._step()
        solver._step()
        tracemalloc.start()
        try:
            _, grads, _, _ = solver._step()
            return grads, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    options = dict(update_rule="sgd_momentum", batch_size=30, num_epochs=1, verbose=False)
    solver = Solver(model, wide, **options)
    grads, peak = traced_step(solver)
    views = solver._exchange.gradient_views(model.params)
    assert all(grads[name] is views[name] for name in model.params)
    plain = Solver(PlainModel(), wide, **options)
    _, plain_peak = traced_step(plain)
    assert plain._exchange._fused is None  # no buffer laid out for a model that returns its own arrays
    assert plain_peak - peak >= sum(w.nbytes for w in model.params.values()), (plain_peak, peak)


@pytest.mark.parametrize("rule", ["sgd_momentum", "adam"])
def test_weight_decay_inside_the_rules_pass_is_the_separate_pass_bit_for_bit(data, rule):
    """The built-in in-place rules take the decay's scaling as w_scale (no pass of its own over the weights); a rule
    whose in-place variant does not take it gets the scaling as a pass before it. The same parameters, bit for bit."""
    from dpnet import registry

    builtin = registry.get_update_rule(rule)

    def without_w_scale(w, dw, config=None):
        return builtin(w, dw, config)

    without_w_scale.in_place = lambda w, dw, config=None: builtin.in_place(w, dw, config)
    without_w_scale.elementwise = True

    def run(update_rule):
        model = _model(normalization=None)
        solver = Solver(model, data, update_rule=update_rule, optim_config={"learning_rate": 1e-2}, batch_size=32,
                        num_epochs=1, seed=3, verbose=False, weight_decay=0.5)
        solver.train()
        solver.use_params("final")
        return model.params

    folded, separate = run(rule), run(without_w_scale)
    for name, value in folded.items():
        np.testing.assert_array_equal(value, separate[name], err_msg=name)
