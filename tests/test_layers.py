"""Gradient checks (float64) and behaviour of every layer in dpnet.layers."""

import threading

import numpy as np
import pytest

from dpnet.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array, rel_error
from dpnet.layers import (batchnorm_backward, batchnorm_backward_alt, batchnorm_forward, dropout_backward,
                          dropout_forward, layernorm_backward, layernorm_forward, relu_backward, relu_forward,
                          softmax_loss, svm_loss)
from dpnet.layer_utils import affine_norm_act_forward
from dpnet.registry import get_layer


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _norm_grads(forward, backward, x, gamma, beta, param, dout):
    _, cache = forward(x, gamma, beta, dict(param))
    analytic = backward(dout, cache)
    numeric = [eval_numerical_gradient_array(lambda _: forward(x, gamma, beta, dict(param))[0], v, dout,
                                                 h=1e-3, order=4)
               for v in (x, gamma, beta)]
    return analytic, numeric


def test_relu_in_place_only_when_asked(rng):
    x = rng.standard_normal((6, 5))
    kept = x.copy()
    out, cache = relu_forward(x)
    assert np.array_equal(x, kept) and np.array_equal(out, np.maximum(kept, 0))
    dout = rng.standard_normal(x.shape)
    assert np.array_equal(relu_backward(dout, cache), relu_backward(dout, x))  # the output or the input as cache
    out, _ = relu_forward(x, overwrite_x=True)
    assert out is x and np.array_equal(x, np.maximum(kept, 0))


def test_sandwich_relu_leaves_its_inputs_alone(rng):
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    copies = [a.copy() for a in (x, w, b)]
    out, _ = affine_norm_act_forward(x, w, b, get_layer("activation", "relu"))
    assert np.array_equal(out, np.maximum(copies[0] @ copies[1] + copies[2], 0))
    assert all(np.array_equal(a, c) for a, c in zip((x, w, b), copies))


@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt])
def test_batchnorm_gradients(rng, backward):
    x = 5 * rng.standard_normal((4, 5)) + 12
    gamma, beta, dout = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((4, 5))
    analytic, numeric = _norm_grads(batchnorm_forward, backward, x, gamma, beta, {"mode": "train"}, dout)
    for name, a, n in zip(("dx", "dgamma", "dbeta"), analytic, numeric):
        assert rel_error(a, n) < 1e-8, name


def test_batchnorm_alt_equals_graph(rng):
    x = rng.standard_normal((64, 30)) * 3 + 1
    _, cache = batchnorm_forward(x, rng.standard_normal(30), rng.standard_normal(30), {"mode": "train"})
    dout = rng.standard_normal((64, 30))
    for a, b in zip(batchnorm_backward(dout, cache), batchnorm_backward_alt(dout, cache)):
        assert rel_error(a, b) < 1e-12


def test_batchnorm_train_statistics_and_running_averages(rng):
    x = rng.standard_normal((200, 3)) * [1, 2, 3] + [10, -5, 0]
    param = {"mode": "train"}
    out, _ = batchnorm_forward(x, np.ones(3), np.zeros(3), param)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-4)
    np.testing.assert_allclose(param["running_mean"], 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(param["running_var"], 0.9 + 0.1 * x.var(axis=0), rtol=1e-12)
    param["mode"] = "test"
    out, cache = batchnorm_forward(x, np.ones(3), np.zeros(3), param)
    expected = (x - param["running_mean"]) / np.sqrt(param["running_var"] + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_layernorm_gradients(rng):
    x = 5 * rng.standard_normal((4, 6)) + 12
    gamma, beta, dout = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((4, 6))
    analytic, numeric = _norm_grads(layernorm_forward, layernorm_backward, x, gamma, beta, {}, dout)
    for name, a, n in zip(("dx", "dgamma", "dbeta"), analytic, numeric):
        assert rel_error(a, n) < 1e-8, name


def test_layernorm_normalizes_each_sample(rng):
    x = rng.standard_normal((3, 50)) * 4 + 7
    out, _ = layernorm_forward(x, np.ones(50), np.zeros(50), {"mode": "test"})
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("forward, param", [(batchnorm_forward, {"mode": "bogus"}),
                                            (layernorm_forward, {"mode": "bogus"})])
def test_invalid_mode_names_it(forward, param):
    with pytest.raises(ValueError, match="bogus"):
        forward(np.ones((2, 3)), np.ones(3), np.zeros(3), param)
    with pytest.raises(ValueError, match="bogus"):
        dropout_forward(np.ones((2, 3)), {"p": 0.5, "mode": "bogus"})


def _run_as_processes(shards, body):
    """Run body(rank, shard, reducer) in one thread per shard; the reducer sums over the threads."""
    size = len(shards)
    barrier, slots, results = threading.Barrier(size), [None] * size, [None] * size

    def make_reducer(rank):
        def reduce_sum(a):
            slots[rank] = np.array(a)
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        return reduce_sum

    def run(rank):
        results[rank] = body(rank, shards[rank], make_reducer(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt])
def test_synchronized_batchnorm_equals_one_process(rng, backward):
    """Uneven shards with a reducer compute exactly what one process computes on the whole batch."""
    N, D = 13, 4
    x = rng.standard_normal((N, D)) * 2 + 3
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal((N, D))  # gradient of the global mean loss
    full_param = {"mode": "train"}
    full_out, cache = batchnorm_forward(x, gamma, beta, full_param)
    full_dx, full_dgamma, full_dbeta = backward(dout, cache)

    bounds = [0, 2, 7, 13]
    shards = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def body(rank, rows, reducer):
        n = rows.stop - rows.start
        param = {"mode": "train", "reducer": reducer}
        out, cache = batchnorm_forward(x[rows], gamma, beta, param)
        local_dout = dout[rows] * (N / n)  # each process differentiates its own mean loss
        dx, dgamma, dbeta = backward(local_dout, cache)
        weight = n / N  # what the Solver applies before summing gradients
        return out, dx * weight, dgamma * weight, dbeta * weight, param

    results = _run_as_processes(shards, body)
    assert rel_error(np.concatenate([r[0] for r in results]), full_out) < 1e-12
    assert rel_error(np.concatenate([r[1] for r in results]), full_dx) < 1e-10
    assert rel_error(sum(r[2] for r in results), full_dgamma) < 1e-12
    assert rel_error(sum(r[3] for r in results), full_dbeta) < 1e-12
    for r in results:
        assert rel_error(r[4]["running_mean"], full_param["running_mean"]) < 1e-12
        assert rel_error(r[4]["running_var"], full_param["running_var"]) < 1e-12


def test_dropout_keep_probability_and_scaling(rng):
    x = rng.standard_normal((500, 500)) + 10
    for p in (0.25, 0.4, 0.7):
        out, _ = dropout_forward(x, {"mode": "train", "p": p, "seed": 123})
        assert abs((out != 0).mean() - p) < 0.01
        assert abs(out.mean() - x.mean()) < 0.1  # inverted dropout keeps the expectation
        test_out, _ = dropout_forward(x, {"mode": "test", "p": p})
        np.testing.assert_array_equal(test_out, x)


def test_dropout_gradient_and_seed(rng):
    x, dout = rng.standard_normal((10, 10)) + 10, rng.standard_normal((10, 10))
    param = {"mode": "train", "p": 0.2, "seed": 123}
    out, cache = dropout_forward(x, param)
    dx = dropout_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(lambda xx: dropout_forward(xx, param)[0], x, dout, h=1e-3, order=4)
    assert rel_error(dx, dx_num) < 1e-10
    np.testing.assert_array_equal(out, dropout_forward(x, param)[0])  # same seed, same mask
    generator_param = {"mode": "train", "p": 0.5, "rng": np.random.default_rng(5)}
    first, second = dropout_forward(x, generator_param)[0], dropout_forward(x, generator_param)[0]
    assert not np.array_equal(first, second)  # a generator advances between steps


def test_dropout_of_float32_draws_and_scales_in_float32(rng):
    x = (rng.standard_normal((400, 300)) + 10).astype(np.float32)
    out, (_, mask) = dropout_forward(x, {"mode": "train", "p": 0.7, "rng": np.random.default_rng(0)})
    assert out.dtype == mask.dtype == np.float32
    assert set(np.unique(mask)) == {0, np.float32(1) / np.float32(0.7)}
    assert abs((mask != 0).mean() - 0.7) < 0.01
    np.testing.assert_array_equal(out, x * mask)
    again, _ = dropout_forward(x, {"mode": "train", "p": 0.7, "rng": np.random.default_rng(0)})
    np.testing.assert_array_equal(again, out)


@pytest.mark.parametrize("p", [0, -0.1, 1.5])
def test_dropout_rejects_bad_keep_probability(p):
    with pytest.raises(ValueError, match="keep probability"):
        dropout_forward(np.ones(3), {"mode": "train", "p": p})


@pytest.mark.parametrize("loss_fn", [softmax_loss, svm_loss])
def test_loss_gradients(rng, loss_fn):
    x = rng.standard_normal((50, 10))
    y = rng.integers(10, size=50)
    loss, dx = loss_fn(x, y)
    # Softmax is smooth: a fourth-order stencil resolves it to 1e-8. The hinge is piecewise linear, so the seed's
    # centred difference is exact away from the kinks.
    order, h = (4, 1e-3) if loss_fn is softmax_loss else (2, 1e-5)
    dx_num = eval_numerical_gradient(lambda xx: loss_fn(xx, y)[0], x, verbose=False, h=h, order=order)
    assert rel_error(dx, dx_num) < 1e-8


def test_svm_loss_value():
    x = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])  # CS231n's lecture example
    loss, _ = svm_loss(x, np.array([0, 1, 2]))
    assert abs(loss - (2.9 + 0 + 12.9) / 3) < 1e-12


@pytest.mark.parametrize("loss_fn", [softmax_loss, svm_loss])
def test_losses_are_stable_for_large_scores(loss_fn):
    x = np.array([[1e4, 0.0, -1e4], [0.0, 2e4, 1e3]])
    loss, dx = loss_fn(x, np.array([1, 1]))
    assert np.isfinite(loss) and np.isfinite(dx).all()


@pytest.mark.parametrize("loss_fn", [softmax_loss, svm_loss])
def test_losses_reject_bad_labels(loss_fn):
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        loss_fn(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(x, np.array([0.0, 1.0, 2.0]))


def test_affine_backward_can_skip_the_input_gradient(rng):
    from dpnet.layers import affine_backward, affine_forward

    x, w, b, dout = rng.standard_normal((4, 2, 3)), rng.standard_normal((6, 5)), rng.standard_normal(5), \
        rng.standard_normal((4, 5))
    _, cache = affine_forward(x, w, b)
    dx, dw, db = affine_backward(dout, cache)
    none, dw2, db2 = affine_backward(dout, cache, need_dx=False)
    assert none is None and dx.shape == x.shape
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)


def test_label_smoothing_value_and_gradient(rng):
    x, y = rng.standard_normal((20, 5)), rng.integers(5, size=20)
    eps = 0.1
    loss, dx = softmax_loss(x, y, smoothing=eps)
    log_probs = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    target = np.full((20, 5), eps / 5)
    target[np.arange(20), y] += 1 - eps
    assert loss == pytest.approx(-(target * log_probs).sum() / 20, rel=1e-13)
    dx_num = eval_numerical_gradient(lambda xx: softmax_loss(xx, y, smoothing=eps)[0], x, verbose=False, h=1e-3,
                                     order=4)
    assert rel_error(dx, dx_num) < 1e-8
    assert softmax_loss(x, y, smoothing=0.0)[0] == softmax_loss(x, y)[0]
    with pytest.raises(ValueError, match="smoothing"):
        softmax_loss(x, y, smoothing=1.0)
