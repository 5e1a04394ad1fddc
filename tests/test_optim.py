"""Update rules against CS231n's reference values, and their config handling."""

import numpy as np
import pytest

from dpnet.gradient_check import rel_error
from dpnet.optim import adam, rmsprop, sgd, sgd_momentum

N, D = 4, 5


def _inputs():
    w = np.linspace(-0.4, 0.6, num=N * D).reshape(N, D)
    dw = np.linspace(-0.6, 0.4, num=N * D).reshape(N, D)
    return w, dw


def test_sgd():
    w, dw = _inputs()
    next_w, config = sgd(w, dw)
    assert config["learning_rate"] == 1e-2
    assert rel_error(next_w, w - 1e-2 * dw) < 1e-15


def test_sgd_momentum_reference():
    w, dw = _inputs()
    v = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    config = {"learning_rate": 1e-3, "velocity": v}
    next_w, _ = sgd_momentum(w, dw, config=config)
    expected_next_w = np.asarray([
        [0.1406, 0.20738947, 0.27417895, 0.34096842, 0.40775789],
        [0.47454737, 0.54133684, 0.60812632, 0.67491579, 0.74170526],
        [0.80849474, 0.87528421, 0.94207368, 1.00886316, 1.07565263],
        [1.14244211, 1.20923158, 1.27602105, 1.34281053, 1.4096]])
    expected_velocity = np.asarray([
        [0.5406, 0.55475789, 0.56891579, 0.58307368, 0.59723158],
        [0.61138947, 0.62554737, 0.63970526, 0.65386316, 0.66802105],
        [0.68217895, 0.69633684, 0.71049474, 0.72465263, 0.73881053],
        [0.75296842, 0.76712632, 0.78128421, 0.79544211, 0.8096]])
    assert rel_error(next_w, expected_next_w) < 1e-8
    assert rel_error(config["velocity"], expected_velocity) < 1e-8


def test_rmsprop_reference():
    w, dw = _inputs()
    cache = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    config = {"learning_rate": 1e-2, "cache": cache}
    next_w, _ = rmsprop(w, dw, config=config)
    expected_next_w = np.asarray([
        [-0.39223849, -0.34037513, -0.28849239, -0.23659121, -0.18467247],
        [-0.132737, -0.08078555, -0.02881884, 0.02316247, 0.07515774],
        [0.12716641, 0.17918792, 0.23122175, 0.28326742, 0.33532447],
        [0.38739248, 0.43947102, 0.49155973, 0.54365823, 0.59576619]])
    expected_cache = np.asarray([
        [0.5976, 0.6126277, 0.6277108, 0.64284931, 0.65804321],
        [0.67329252, 0.68859723, 0.70395734, 0.71937285, 0.73484377],
        [0.75037008, 0.7659518, 0.78158892, 0.79728144, 0.81302936],
        [0.82883269, 0.84469141, 0.86060554, 0.87657507, 0.8926]])
    assert rel_error(next_w, expected_next_w) < 1e-7
    assert rel_error(config["cache"], expected_cache) < 1e-8


def test_adam_reference():
    w, dw = _inputs()
    m = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    v = np.linspace(0.7, 0.5, num=N * D).reshape(N, D)
    config = {"learning_rate": 1e-2, "m": m, "v": v, "t": 5}
    next_w, _ = adam(w, dw, config=config)
    expected_next_w = np.asarray([
        [-0.40094747, -0.34836187, -0.29577703, -0.24319299, -0.19060977],
        [-0.1380274, -0.08544591, -0.03286534, 0.01971428, 0.0722929],
        [0.1248705, 0.17744702, 0.23002243, 0.28259667, 0.33516969],
        [0.38774145, 0.44031188, 0.49288093, 0.54544852, 0.59801459]])
    expected_v = np.asarray([
        [0.69966, 0.68908382, 0.67851319, 0.66794809, 0.65738853],
        [0.64683452, 0.63628604, 0.6257431, 0.61520571, 0.60467385],
        [0.59414753, 0.58362676, 0.57311152, 0.56260183, 0.55209767],
        [0.54159906, 0.53110598, 0.52061845, 0.51013645, 0.49966]])
    expected_m = np.asarray([
        [0.48, 0.49947368, 0.51894737, 0.53842105, 0.55789474],
        [0.57736842, 0.59684211, 0.61631579, 0.63578947, 0.65526316],
        [0.67473684, 0.69421053, 0.71368421, 0.73315789, 0.75263158],
        [0.77210526, 0.79157895, 0.81105263, 0.83052632, 0.85]])
    # CS231n prints 1.1395691798535431e-07 for next_w: its reference is rounded to 8 decimals and has an entry
    # near zero (0.01971428).
    assert rel_error(next_w, expected_next_w) < 1.2e-7
    assert rel_error(config["v"], expected_v) < 1e-8
    assert rel_error(config["m"], expected_m) < 1e-8
    assert config["t"] == 6


@pytest.mark.parametrize("rule, defaults", [
    (sgd, {"learning_rate": 1e-2}),
    (sgd_momentum, {"learning_rate": 1e-2, "momentum": 0.9}),
    (rmsprop, {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}),
    (adam, {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "t": 1}),
])
def test_defaults_and_purity(rule, defaults):
    w, dw = _inputs()
    w0, dw0 = w.copy(), dw.copy()
    _, config = rule(w, dw)
    for key, value in defaults.items():
        assert config[key] == value, key
    np.testing.assert_array_equal(w, w0)  # rules never modify their inputs
    np.testing.assert_array_equal(dw, dw0)


@pytest.mark.parametrize("rule", [sgd, sgd_momentum, rmsprop, adam])
def test_float32_stays_float32(rule):
    w, dw = (a.astype(np.float32) for a in _inputs())
    config = None
    for _ in range(3):
        w, config = rule(w, dw, config)
    assert w.dtype == np.float32


def test_sgd_promotes_mixed_dtypes_like_numpy():
    w, dw = np.ones(3), np.ones(3, dtype=np.float32)
    next_w, _ = sgd(w, dw, {"learning_rate": 0.5})
    assert next_w.dtype == np.float64 and np.all(next_w == 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [sgd, sgd_momentum, rmsprop, adam])
def test_in_place_variant_agrees_bit_for_bit_with_the_pure_rule(rule, dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 7)).astype(dtype)
    pure, pure_config = w.copy(), {"learning_rate": 1e-2}
    mine, my_config = w.copy(), {"learning_rate": 1e-2}
    for step in range(6):
        dw = rng.standard_normal(w.shape).astype(dtype)
        dw0 = dw.copy()
        pure, pure_config = rule(pure, dw, pure_config)
        result, my_config = rule.in_place(mine, dw, my_config)
        assert result is mine  # updated in place, not reallocated
        np.testing.assert_array_equal(dw, dw0)
        np.testing.assert_array_equal(mine, pure)
        assert mine.dtype == dtype
    assert pure_config.keys() == my_config.keys()
    for key, value in pure_config.items():
        np.testing.assert_array_equal(my_config[key], value, err_msg=key)


def test_state_that_cannot_be_updated_in_place_is_copied_once():
    w, dw = _inputs()
    velocity = np.zeros((N, D))
    velocity.flags.writeable = False
    config = {"velocity": velocity}
    sgd_momentum(w, dw, config)
    assert config["velocity"] is not velocity and not np.all(config["velocity"] == 0)
    assert np.all(velocity == 0)
    state = config["velocity"]
    sgd_momentum(w, dw, config)
    assert config["velocity"] is state  # from then on updated in place
    lower = {"m": np.zeros((N, D), dtype=np.float32), "v": np.zeros((N, D), dtype=np.float32)}
    adam(w, dw, lower)  # float64 weights: float32 state is widened, not used to round the float64 step
    assert lower["m"].dtype == lower["v"].dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [sgd, sgd_momentum, rmsprop, adam])
def test_updates_in_blocks_compute_what_whole_arrays_compute(rule, dtype, monkeypatch):
    """Block by block (a last block shorter than the others), whole arrays, and arrays that cannot be cut into flat
    blocks (not C-contiguous): the same values, bit for bit."""
    import dpnet.optim

    rng = np.random.default_rng(1)
    w, dw = (rng.standard_normal((9, 7)).astype(dtype) for _ in range(2))
    results = []
    for block_bytes, order in ((1 << 30, "C"), (5 * np.dtype(dtype).itemsize, "C"), (8, "F")):
        monkeypatch.setattr(dpnet.optim, "BLOCK_BYTES", block_bytes)
        mine, config = np.array(w, order=order), {"learning_rate": 1e-2}
        for _ in range(3):
            rule.in_place(mine, np.array(dw, order=order), config)
        results.append(mine)
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [sgd, sgd_momentum, rmsprop, adam])
def test_w_scale_is_a_scaling_before_the_update_bit_for_bit(rule, dtype, monkeypatch):
    """in_place(..., w_scale=s), block by block (blocks of 5 elements, a shorter last one) or whole (not
    C-contiguous), is `w *= s` followed by the update, bit for bit: the Solver's weight decay without its own pass."""
    import dpnet.optim

    monkeypatch.setattr(dpnet.optim, "BLOCK_BYTES", 5 * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 7)).astype(dtype)
    for order in ("C", "F"):
        scaled, folded = np.array(w, order=order), np.array(w, order=order)
        scaled_config, folded_config = {"learning_rate": 1e-2}, {"learning_rate": 1e-2}
        for _ in range(3):
            dw = np.array(rng.standard_normal(w.shape).astype(dtype), order=order)
            scale = 1 - 1e-2 * 0.3
            scaled *= scale
            rule.in_place(scaled, dw, scaled_config)
            assert rule.in_place(folded, dw, folded_config, w_scale=scale)[0] is folded
        np.testing.assert_array_equal(folded, scaled, err_msg=order)
        assert not np.array_equal(folded, w)
