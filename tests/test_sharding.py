"""The layout of the sharded exchange (in one process: the collectives themselves run in tests/test_solver_mpi.py)."""

from types import SimpleNamespace

import numpy as np
import pytest

from dpnet.parallel import SerialCommunicator, ShardedExchange, ShardError, block_counts


def _params():
    rng = np.random.default_rng(0)
    return {"W1": rng.standard_normal((7, 5)), "b1": rng.standard_normal(5), "W2": rng.standard_normal((5, 3)),
            "b2": rng.standard_normal(3), "gamma1": rng.standard_normal(5)}


@pytest.mark.parametrize("n, size", [(0, 3), (5, 1), (5, 2), (7, 3), (10, 4), (3, 5)])
def test_block_counts_cover_everything_evenly(n, size):
    counts = block_counts(n, size)
    assert len(counts) == size and sum(counts) == n and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 60])
def test_the_processes_segments_partition_every_parameter(size):
    params = _params()
    states = [ShardedExchange(SimpleNamespace(rank=r, size=size), params) for r in range(size)]
    for name, value in params.items():
        covered = np.zeros(value.size, dtype=int)
        for state in states:
            start, stop = state.segments[name]
            covered[start:stop] += 1
        assert (covered == 1).all(), name
    n = sum(v.size for v in params.values())
    blocks = {state.hi - state.lo for state in states}  # equal blocks (MPI's faster collectives), padded at the end
    assert len(blocks) == 1 and n <= size * blocks.pop() < n + size
    assert all(state.counts == states[0].counts for state in states)


def test_shard_config_keeps_the_segment_of_whole_state_arrays():
    params = _params()
    state = ShardedExchange(SimpleNamespace(rank=1, size=3), params)
    start, stop = state.segments["W1"]
    whole = np.arange(35.0).reshape(7, 5)
    config = state.shard_config("W1", {"learning_rate": 0.1, "m": whole, "t": 4})
    assert config["learning_rate"] == 0.1 and config["t"] == 4
    np.testing.assert_array_equal(config["m"], whole.reshape(-1)[start:stop])
    assert not np.shares_memory(config["m"], whole)
    segment = config["m"]
    assert state.shard_config("W1", config)["m"] is segment  # a segment stays as it is


def test_one_process_binds_the_model_to_one_flat_vector_and_updates_it():
    params = _params()
    original = {name: value.copy() for name, value in params.items()}
    held = params["W1"]
    state = ShardedExchange(SerialCommunicator(), params)
    state.bind(params)
    assert all(np.shares_memory(value, state.params) for value in params.values())
    assert held is not params["W1"] and np.array_equal(held, original["W1"])  # copied in, the old array untouched
    grads = state.gradient_views(params)
    for name, view in grads.items():
        view[...] = 1.0
    loss = state.reduce(2.0, grads, 0.5)
    assert loss == 1.0 and state.grad_norm == pytest.approx(0.5 * np.sqrt(sum(v.size for v in params.values())))

    def sgd(name, w, dw, config):
        w -= 0.1 * dw
        return w, config

    configs = {name: {} for name in params}
    state.update(params, configs, sgd)
    for name, value in params.items():
        np.testing.assert_allclose(value, original[name] - 0.05)


def test_parameters_of_several_dtypes_are_refused():
    params = {**_params(), "b2": np.zeros(3, dtype=np.float32)}
    with pytest.raises(ShardError, match=r"one dtype .* \['float32', 'float64'\]"):
        ShardedExchange(SimpleNamespace(rank=0, size=2), params)
