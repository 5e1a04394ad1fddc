"""MixUp and CutMix (dpnet.mixing): soft targets in the softmax loss, the draws and their application, the Solver's
checks, and N processes computing what one process computes (tests/mpi_scripts/solver_mixing.py)."""

import functools
import re

import numpy as np
import pytest
from scripts import load_mpi_script

from dpnet.augment import Augmentation
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.distributed import SerialCommunicator
from dpnet.gradient_check import eval_numerical_gradient, rel_error
from dpnet.layers import softmax_loss, svm_loss
from dpnet.mixing import Mix, Mixing
from dpnet.models import Sequential
from dpnet.solver import Solver


def _soft_targets(rng, n, c):
    t = rng.random((n, c)) ** 3
    return t / t.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_loss_with_soft_targets_passes_the_gradient_check(smoothing):
    rng = np.random.default_rng(0)
    x, t = 3 * rng.standard_normal((7, 5)), _soft_targets(rng, 7, 5)
    loss, dx = softmax_loss(x, t, smoothing=smoothing)
    numeric = eval_numerical_gradient(lambda v: softmax_loss(v, t, smoothing=smoothing)[0], x.copy(), verbose=False)
    assert rel_error(dx, numeric) <= 1e-7
    smoothed = (1 - smoothing) * t + smoothing / 5
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.sum(smoothed * np.log(p)) / 7, rel=1e-13)
    np.testing.assert_allclose(dx, (p - smoothed) / 7, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_integer_labels_are_their_one_hot_targets(smoothing):
    rng = np.random.default_rng(1)
    x, y = 5 * rng.standard_normal((40, 10)), rng.integers(10, size=40)
    one_hot = np.eye(10)[y]
    loss, dx = softmax_loss(x, y, smoothing=smoothing)
    soft_loss, soft_dx = softmax_loss(x, one_hot, smoothing=smoothing)
    assert abs(soft_loss - loss) <= 1e-15 * abs(loss)
    if smoothing:
        assert np.max(np.abs(soft_dx - dx)) <= 1e-15 * np.max(np.abs(dx))
    else:
        np.testing.assert_array_equal(soft_dx, dx)  # bit for bit
    x32 = x.astype(np.float32)  # float32 scores: the targets are cast, the gradient stays float32
    assert softmax_loss(x32, one_hot)[1].dtype == np.float32
    np.testing.assert_array_equal(softmax_loss(x32, one_hot)[1], softmax_loss(x32, y)[1])


@pytest.mark.parametrize("targets, match", [
    (np.full((4, 3), 1 / 3), r"shape \(4, 3\), expected \(4, 5\)"),
    (np.eye(5, dtype=np.int64)[:4], "must be floating point"),
    (np.full((4, 5), 0.3), "must sum to 1"),
    (np.where(np.eye(5)[:4] > 0, 1.5, -0.125), "non-negative"),
    (np.full((4, 5), np.nan), "finite"),
])
def test_bad_soft_targets_are_named(targets, match):
    with pytest.raises(ValueError, match=match):
        softmax_loss(np.zeros((4, 5)), targets)


def test_models_pass_soft_targets_through_and_say_whether_their_loss_takes_them():
    rng = np.random.default_rng(2)
    X, t = rng.standard_normal((6, 12)), _soft_targets(rng, 6, 3)
    fc = FullyConnectedNet([8], input_dim=12, num_classes=3, dtype=np.float64, seed=0, label_smoothing=0.1)
    seq = Sequential([{"layer": "affine", "units": 8}, "relu", {"layer": "affine", "units": 3}], input_dim=(12,),
                     dtype=np.float64, seed=0)
    for model in (fc, seq):
        assert model.soft_targets
        loss, grads = model.loss(X, t)
        assert np.isfinite(loss) and grads.keys() == model.params.keys()
        one_hot_loss = model.loss(X, np.eye(3)[[0, 1, 2, 0, 1, 2]])[0]
        assert one_hot_loss == pytest.approx(model.loss(X, np.array([0, 1, 2, 0, 1, 2]))[0], rel=1e-14)
    assert not FullyConnectedNet([8], input_dim=12, num_classes=3, loss="svm").soft_targets
    assert not getattr(svm_loss, "soft_targets", False)


# ----------------------------------------------------------------------------------------------- draws
@pytest.mark.parametrize("kwargs, match", [
    (dict(mixup=-0.1), "mixup is the alpha"), (dict(cutmix=float("inf")), "cutmix is the alpha"),
    (dict(probability=1.5), "probability must be in"), (dict(cutmix_probability=-1), "cutmix_probability"),
])
def test_bad_mixing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mixing(**kwargs)


def test_draws_follow_the_probabilities_and_cutmix_lam_is_the_uncovered_area():
    rng = np.random.default_rng(3)
    both = Mixing(mixup=0.5, cutmix=1.0, probability=0.6, cutmix_probability=0.25)
    draws = [both.draw(rng, 10, (3, 16, 12)) for _ in range(4000)]
    mixed = [d for d in draws if d is not None]
    assert len(mixed) / len(draws) == pytest.approx(0.6, abs=0.03)
    cut = [d for d in mixed if d.box is not None]
    assert len(cut) / len(mixed) == pytest.approx(0.25, abs=0.03)
    for d in mixed:
        assert sorted(d.partner) == list(range(10)) and 0 <= d.lam <= 1
        if d.box is not None:
            top, bottom, left, right = d.box
            assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 12
            assert d.lam == 1 - (bottom - top) * (right - left) / (16 * 12)
    assert not Mixing().enabled and not Mixing(mixup=1.0, probability=0).enabled and Mixing(cutmix=1.0).enabled
    assert all(Mixing(mixup=1.0).draw(rng, 4, ()).box is None for _ in range(20))


def test_apply_blends_or_pastes_and_targets_mix_the_labels():
    rng = np.random.default_rng(4)
    X, other = rng.standard_normal((3, 2, 5, 6)), rng.standard_normal((3, 2, 5, 6))
    blended = Mixing.apply(X.copy(), other.copy(), Mix(np.arange(3), 0.3, None))
    np.testing.assert_allclose(blended, 0.3 * X + 0.7 * other, rtol=1e-15)
    pasted = Mixing.apply(X.copy(), other.copy(), Mix(np.arange(3), 1 - 6 / 30, (1, 3, 2, 5)))
    np.testing.assert_array_equal(pasted[..., 1:3, 2:5], other[..., 1:3, 2:5])
    pasted[..., 1:3, 2:5] = X[..., 1:3, 2:5]
    np.testing.assert_array_equal(pasted, X)
    targets = Mix(np.arange(3), 0.25, None).targets(np.array([0, 2, 1]), np.array([1, 2, 3]), 4)
    np.testing.assert_array_equal(targets, [[0.25, 0.75, 0, 0], [0, 0, 1, 0], [0, 0.25, 0, 0.75]])


# ----------------------------------------------------------------------------------------------- the Solver
def _data(n=120, shape=(3, 6, 6), classes=3):
    rng = np.random.default_rng(5)
    centres = 2 * rng.standard_normal((classes, *shape))
    data = {}
    for split, size in (("train", n), ("val", 30)):
        y = rng.integers(classes, size=size)
        data[f"X_{split}"], data[f"y_{split}"] = centres[y] + rng.standard_normal((size, *shape)), y
    return data


def _model(**kwargs):
    return FullyConnectedNet([10], input_dim=108, num_classes=3, dtype=np.float64, seed=0, **kwargs)


def test_mixing_trains_and_mixing_off_is_the_plain_run_bit_for_bit():
    def run(**kwargs):
        solver = Solver(_model(), _data(), batch_size=20, num_epochs=2, seed=1, verbose=False,
                        optim_config={"learning_rate": 0.05}, augment=Augmentation(crop_padding=1), **kwargs)
        solver.train()
        return solver

    plain = run()
    for off in (run(mixing=None), run(mixing=Mixing()), run(mixing=Mixing(mixup=1.0, probability=0))):
        assert off.loss_history == plain.loss_history and off.mixing is None
        for name, value in plain.model.params.items():
            np.testing.assert_array_equal(off.model.params[name], value)
    mixed = run(mixing=Mixing(mixup=0.4, cutmix=1.0))
    assert mixed.loss_history != plain.loss_history
    assert mixed.loss_history == run(mixing=Mixing(mixup=0.4, cutmix=1.0)).loss_history  # reproducible
    assert np.isfinite(mixed.loss_history).all()


def test_a_mixed_batch_is_the_batch_with_its_partners_and_mixed_targets():
    """One step's (X, y) against the batch assembled by hand: the rows, their crops and flips, the partners' own."""
    data, augment, mixing = _data(), Augmentation(crop_padding=1), Mixing(mixup=0.5)
    solver = Solver(_model(), data, batch_size=20, seed=2, verbose=False, augment=augment, mixing=mixing)
    X, y, n = solver._minibatch()
    rng_order, rng_augment, rng_mix = (np.random.default_rng([solver.seed, purpose, 0]) for purpose in (0, 3, 4))
    indices = rng_order.permutation(120)[:20]
    choices = augment.draw(rng_augment, 20)
    mix = mixing.draw(rng_mix, 20, (3, 6, 6))
    images = augment.apply(data["X_train"][indices], choices)
    order = np.argsort(indices)  # the Solver's shard is sorted by image index
    expected = mix.lam * images + (1 - mix.lam) * images[mix.partner]
    np.testing.assert_allclose(X, expected[order], rtol=1e-14, atol=1e-14)
    labels = data["y_train"][indices]
    np.testing.assert_array_equal(y, mix.targets(labels, labels[mix.partner], 3)[order])
    assert n == 20


@pytest.mark.parametrize("model, data, mixing, match", [
    (lambda: _model(loss="svm"), _data, Mixing(mixup=0.2), "the loss 'svm' does not"),
    (_model, lambda: {k: v.reshape(len(v), -1) if k.startswith("X") else v for k, v in _data().items()},
     Mixing(cutmix=1.0), r"cutmix needs images of shape \(N, C, H, W\)"),
    (_model, _data, dict(mixup=0.2), "mixing must be a dpnet.mixing.Mixing"),
])
def test_the_solver_refuses_what_cannot_be_mixed(model, data, mixing, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Solver(model(), data(), mixing=mixing)


def test_a_plugin_model_must_say_its_loss_takes_soft_targets():
    class Plain:  # a model of one's own, without soft_targets
        num_classes = 3

        def __init__(self):
            self.inner = _model()
            self.params = self.inner.params

        def loss(self, X, y=None):
            return self.inner.loss(X, y)

    with pytest.raises(ValueError, match=r"a Plain does not say it does \(model.soft_targets\)"):
        Solver(Plain(), _data(), mixing=Mixing(mixup=0.2))
    Solver(Plain(), _data(), mixing=Mixing())  # nothing to mix: accepted


# ----------------------------------------------------------------------------------------------- N processes
mixing_runs = load_mpi_script("solver_mixing")
EXACT = [case for case, options in mixing_runs.CASES.items() if options.get("sync_batchnorm", True)]


@functools.lru_cache(maxsize=None)
def serial_reference(case):
    return mixing_runs.run(case, SerialCommunicator())


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"n{n}")
def mpi_mixing(request, run_mpi, tmp_path_factory):
    """All cases trained by `mpiexec -n N`: (N, {case: {key: array}})."""
    n = request.param
    path = tmp_path_factory.mktemp(f"mixing_n{n}") / "results.npz"
    result = run_mpi(n, "solver_mixing.py", path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    results = {}
    with np.load(path) as archive:
        assert int(archive["size"]) == n
        for key in archive.files:
            if key != "size":
                case, name = key.split(":", 1)
                results.setdefault(case, {})[name] = archive[key]
    return n, results


def _scale(reference, key):
    """What an array's difference is relative to: its own largest value, but for the biases feeding a batchnorm
    (zero gradients in exact arithmetic: their values are rounding noise), whose layer's weights give the scale."""
    match = re.fullmatch(r"(.*/)b(\d+)", key) or re.fullmatch(r"(.*/)affine(\d+)\.b", key)
    if match:
        fc, seq = f"{match[1]}gamma{match[2]}", f"{match[1]}batchnorm{match[2]}.gamma"
        weights = f"{match[1]}W{match[2]}" if fc in reference else f"{match[1]}affine{match[2]}.W"
        if fc in reference or seq in reference:
            return np.max(np.abs(reference[weights]))
    return np.max(np.abs(reference[key]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", EXACT)
def test_n_processes_mix_what_one_process_mixes(mpi_mixing, case):
    """Float64, crops and flips on: the parameters after the last step, the best ones, the average of them, the last
    summed gradient, within 1e-10 relative of one process's; the same losses (to 1e-12) and accuracies."""
    n, results = mpi_mixing
    ours, reference = results[case], serial_reference(case)
    assert ours.keys() == reference.keys()
    arrays = [key for key in reference if key.startswith(("last/", "best/", "ema/", "grads/"))]
    assert len(arrays) >= 18 and ("ema" not in case or any(key.startswith("ema/norm/") for key in arrays))
    for key in arrays:
        assert ours[key].dtype == np.float64 and ours[key].shape == reference[key].shape, key
        difference = np.max(np.abs(ours[key] - reference[key])) / _scale(reference, key)
        assert difference <= 1e-10, f"{key}: {difference:.2e}"
    np.testing.assert_allclose(ours["loss_history"], reference["loss_history"], rtol=1e-12, atol=0)
    for key in ("val_acc_history", "train_acc_history", "ema_val_acc_history", "best_source"):
        if key in reference:
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert reference["val_acc_history"][-1] > 0.5  # the runs learn something


@pytest.mark.timeout(180)
def test_unsynchronized_batchnorm_keeps_the_averages_identical(mpi_mixing):
    """sync_batchnorm=False with an average: the job's per-epoch check of the replicas (the average included) passed."""
    n, results = mpi_mixing
    ours = results["nosync-ema-both"]
    assert len(ours["ema_val_acc_history"]) == len(ours["val_acc_history"]) == 3
    assert str(ours["best_source"]) in ("live", "ema")
