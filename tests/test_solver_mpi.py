"""The data-parallel Solver under mpiexec: N processes compute what one process computes, and fail together.

Each MPI test spawns `mpiexec -n N python tests/mpi_scripts/solver_*.py` (fixtures `run_mpi`/`mpiexec` in conftest.py):
skipped locally without mpi4py or mpiexec, failed when $CI is set.
"""

import functools
import re

import numpy as np
import pytest
from scripts import load_mpi_script

from dpnet.distributed import FusedBuffer, SerialCommunicator

equivalence = load_mpi_script("solver_equivalence")
SYNCED = [case for case, options in equivalence.CASES.items() if options.get("sync_batchnorm", True)]


@functools.lru_cache(maxsize=None)
def serial_reference(case):
    """The one-process run of `case` (the lazy case's reference reads the same data eagerly)."""
    return equivalence.run(case.removeprefix("lazy-"), SerialCommunicator())


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"n{n}")
def mpi_results(request, run_mpi, tmp_path_factory):
    """All cases trained by `mpiexec -n N` (one job per N): {case: {key: array}}."""
    n = request.param
    path = tmp_path_factory.mktemp(f"solver_mpi_n{n}") / "results.npz"
    result = run_mpi(n, "solver_equivalence.py", path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(path) as archive:
        assert int(archive["size"]) == n
        results = {}
        for key in archive.files:
            if key != "size":
                case, name = key.split(":", 1)
                results.setdefault(case, {})[name] = archive[key]
    return n, results


def _relative_difference(a, b, scale=None):
    """max |a - b| / max |b| (or / scale)."""
    scale = np.max(np.abs(b)) if scale is None else scale
    return np.max(np.abs(a - b)) / max(scale, np.finfo(b.dtype).tiny)


def _scale(reference, key, case):
    """What a parameter's difference is relative to: its own largest value, except for the biases feeding a batchnorm.

    Batchnorm subtracts the batch mean, so such a bias has a zero gradient in exact arithmetic and stays 0: its
    computed value is rounding noise (1e-19 after 20 sgd steps), meaningless relative to itself. It is measured on the
    scale of its layer's weights instead.
    """
    match = re.fullmatch(r"(last|best)/b(\d+)", key)
    if "batchnorm" in case and match and f"{match[1]}/gamma{match[2]}" in reference:
        return np.max(np.abs(reference[f"{match[1]}/W{match[2]}"]))
    match = re.fullmatch(r"state/b(\d+)/(\w+)", key)  # the update rule's state of such a bias: the same
    if "batchnorm" in case and match and f"last/gamma{match[1]}" in reference:
        return np.max(np.abs(reference[f"state/W{match[1]}/{match[2]}"]))
    match = re.fullmatch(r"grads/b(\d+)", key)  # and its gradient
    if "batchnorm" in case and match and f"last/gamma{match[1]}" in reference:
        return np.max(np.abs(reference[f"grads/W{match[1]}"]))
    return None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", SYNCED)
def test_n_processes_compute_what_one_process_computes(mpi_results, case):
    """Same seed and global batch (50: uneven shards over 3 and 4 processes), float64, 20 steps: the same
    parameters (after the last step and the best ones), update-rule state, batchnorm running statistics, loss history,
    and accuracies; the sharded cases keep each block of the rule's state on one process only."""
    n, results = mpi_results
    ours, reference = results[case], serial_reference(case)
    assert ours.keys() == reference.keys()
    params = [key for key in reference if key.startswith(("last/", "best/", "norm", "state/", "grads/"))]
    assert len(params) >= 18 and ("batchnorm" not in case or "norm0/running_var" in params)
    assert any(key.startswith("state/W1/") for key in params) and "grads/W1" in params  # and what monitors see
    np.testing.assert_allclose(ours["grad_norm"], reference["grad_norm"], rtol=1e-10)
    for key in params:
        assert ours[key].shape == reference[key].shape and ours[key].dtype == np.float64, key
        difference = _relative_difference(ours[key], reference[key], _scale(reference, key, case))
        assert difference <= 1e-10, f"{key}: {difference:.2e}"
    assert len(ours["loss_history"]) == equivalence.EPOCHS * equivalence.NUM_TRAIN // equivalence.BATCH == 20
    np.testing.assert_allclose(ours["loss_history"], reference["loss_history"], rtol=1e-12, atol=0)
    for key in ("train_acc_history", "val_acc_history", "check_accuracy"):  # sharded evaluation: exact counts
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert reference["val_acc_history"][-1] > 0.5  # the runs learn something
    assert ours["ranks_holding_best"].sum() == reference["ranks_holding_best"].sum() == 1  # rank 0 alone
    sharded = case.startswith("sharded")
    assert bool(ours["sharded"]) == sharded and not reference["sharded"]
    # on one machine the processes sum their gradients in shared memory (sharded: and map one parameter vector),
    # unless told not to (then: MPI's collectives)
    assert bool(ours["shared_memory"]) == ("unshared" not in case) and not reference["shared_memory"]
    assert ours["final_is_last"] and reference["final_is_last"]
    assert ours["use_params_restores_norm"] and reference["use_params_restores_norm"]
    assert _relative_difference(ours["scores"], reference["scores"]) <= 1e-10  # test mode, the best parameters
    # the trained model: one copy-on-write mapping per machine, unless told not to use shared memory
    mapping = 0 if "unshared" in case else n
    assert ours["ranks_mapping_the_model"] == mapping and ours["ranks_mapping_best"] == min(mapping, 1)
    assert reference["ranks_mapping_the_model"] == reference["ranks_mapping_best"] == 0
    state_size, whole = int(ours["local_state_size"]), int(reference["local_state_size"])
    assert (state_size <= whole / n + 2) if sharded else state_size == whole, (state_size, whole)


@pytest.mark.timeout(120)
def test_sharded_checkpoints_hold_the_whole_state_and_resume_exactly(run_mpi, tmp_path):
    """3 processes with shard_optimizer write checkpoints holding the whole optimizer state (gathered on rank 0), a
    sharded resume from epoch 2 ends where the uninterrupted run ends, bit for bit, and one process resuming the
    same checkpoint without sharding, or 2 processes sharding it into other blocks, get the same parameters (to
    rounding: their sums are ordered differently)."""
    from dpnet.checkpoint import load_checkpoint, restore_checkpoint
    from dpnet.solver import Solver

    toy = load_mpi_script("toy")
    result = run_mpi(3, "solver_sharded_checkpoint.py", tmp_path, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(tmp_path / "final.npz") as archive:
        final = {key: archive[key] for key in archive.files}
    arrays, _ = load_checkpoint(tmp_path / "run_epoch_2.npz")
    for name, value in toy.toy_model().params.items():
        for key in ("m", "v"):
            assert arrays[f"optim/{name}/{key}"].shape == value.shape  # whole, not rank 0's block
        np.testing.assert_array_equal(final[f"resumed/{name}"], final[f"full/{name}"], err_msg=name)

    serial = Solver(toy.toy_model(), toy.toy_data(), comm=SerialCommunicator(), **toy.SHARDED_OPTIONS)
    restore_checkpoint(serial, tmp_path / "run_epoch_2.npz")
    serial.train()
    serial.use_params("final")
    for name, value in serial.model.params.items():
        assert _relative_difference(value, final[f"full/{name}"]) <= 1e-10, name
    # 2 processes, sharded into other blocks, resume what 3 wrote
    result = run_mpi(2, "solver_sharded_checkpoint.py", tmp_path, "resume", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(tmp_path / "resumed_2.npz") as two:
        for name, value in serial.model.params.items():
            assert _relative_difference(two[name], value) <= 1e-10, name


def test_a_rule_that_is_not_elementwise_is_refused_for_sharding():
    from dpnet.parallel import ShardError
    from dpnet.solver import Solver

    toy = load_mpi_script("toy")

    def clipped_sgd(w, dw, config=None):  # depends on the whole gradient's norm: not elementwise
        return w - 1e-2 * dw / max(1.0, float(np.linalg.norm(dw))), config

    with pytest.raises(ShardError, match="'clipped_sgd' cannot shard its state"):
        Solver(toy.toy_model(), toy.toy_data(), update_rule=clipped_sgd, shard_optimizer=True, verbose=False)


@pytest.mark.timeout(180)
def test_unsynchronized_batchnorm_keeps_replicas_identical(mpi_results):
    """sync_batchnorm=False: each shard normalizes with its own statistics (so the run is not the one-process run),
    but the running statistics are averaged before evaluation and the replicas stay identical (the job's per-epoch
    check_in_sync covers the running statistics too, so it would have failed)."""
    n, results = mpi_results
    ours, reference = results["batchnorm-nosync-adam"], serial_reference("batchnorm-nosync-adam")
    assert _relative_difference(ours["loss_history"][1:], reference["loss_history"][1:]) > 1e-8
    np.testing.assert_allclose(ours["loss_history"], reference["loss_history"], rtol=0.2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sharded", [(), ("--sharded",)], ids=["replicated", "sharded"])
def test_an_error_on_one_rank_ends_the_job(sharded, run_mpi):
    result = run_mpi(3, "solver_faults.py", "fault", *sharded, timeout=30, DPNET_FAULT_INJECT="rank=1,step=5")
    assert result.returncode != 0
    assert result.elapsed < 15, f"the job took {result.elapsed:.1f} s to die"
    assert "dpnet: rank 1 of 3 failed with an unhandled RuntimeError" in result.stderr, result.stderr
    assert "injected fault on rank 1 at step 5" in result.stderr
    assert "finished" not in result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sharded", [(), ("--sharded",)], ids=["replicated", "sharded"])
def test_a_diverging_loss_stops_every_rank_at_the_same_iteration(sharded, run_mpi, tmp_path):
    result = run_mpi(2, "solver_faults.py", "nan", tmp_path, *sharded, timeout=30)
    assert result.returncode != 0
    assert result.elapsed < 15, f"the job took {result.elapsed:.1f} s to die"
    assert "failed with an unhandled FloatingPointError" in result.stderr, result.stderr
    reports = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]  # each rank wrote why it stopped
    iterations = {re.search(r"FloatingPointError: .* at iteration (\d+)", text).group(1) for text in reports}
    assert len(iterations) == 1, reports
    assert "finished" not in result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sharded", [(), ("--sharded",)], ids=["replicated", "sharded"])
def test_sys_exit_on_one_rank_ends_the_job_with_its_code(sharded, run_mpi):
    result = run_mpi(3, "solver_faults.py", "exit", *sharded, timeout=30)
    assert result.returncode == 5, result.stdout + result.stderr
    assert result.elapsed < 15, f"the job took {result.elapsed:.1f} s to die"
    assert "dpnet: rank 0 of 3 left training with SystemExit(5); aborting all ranks" in result.stderr
    assert "finished" not in result.stdout


@pytest.mark.timeout(60)
def test_a_diverged_replica_is_detected_at_the_end_of_the_epoch(run_mpi):
    """Rank 1 of 3 perturbs one weight by 1e-3 at iteration 3; epoch 1 ends at iteration 10 (300 samples, batch 30)."""
    result = run_mpi(3, "solver_faults.py", "diverge", timeout=30)
    assert result.returncode != 0
    assert result.elapsed < 15
    assert ("parameters differ across processes after epoch 1 (iteration 10): rank(s) [1] disagree with "
            "rank(s) [0, 2]") in result.stderr, result.stderr
    assert "finished" not in result.stdout


# ----------------------------------------------------------------------------------------------- in one process
def test_fused_buffer_packs_scaled_arrays_and_hands_back_views():
    grads = {"W": np.arange(6.0).reshape(2, 3), "b": np.array([1.0, 2.0]), "a": np.ones((2, 2, 1))}
    fused = FusedBuffer(grads, extra=1)
    buf = fused.pack(grads, 0.5)
    assert buf is fused.buffer and buf.shape == (13,) and buf.flags.c_contiguous
    assert np.array_equal(buf[:12], np.concatenate([0.5 * grads[k].ravel() for k in ("W", "a", "b")]))
    for name, view in fused.views.items():
        assert view.shape == grads[name].shape and np.shares_memory(view, buf)
    fused.extra[0] = 7
    assert buf[-1] == 7
    assert fused.pack({k: v.astype(np.float32) for k, v in grads.items()}) is buf  # cast into the buffer's dtype
    with pytest.raises(ValueError, match="changed"):
        fused.pack({"W": grads["W"], "b": grads["b"]})
    with pytest.raises(ValueError, match="changed"):
        fused.pack({**grads, "b": np.ones(3)})


def test_fused_buffer_scales_gradients_written_into_it_in_place():
    grads = {"W": np.arange(6.0).reshape(2, 3), "b": np.array([1.0, 2.0])}
    fused = FusedBuffer(grads, extra=1)
    fused.extra[0] = 9
    for name, value in grads.items():
        fused.views[name][...] = value
    assert fused.pack(dict(fused.views), 0.25) is fused.buffer
    assert np.array_equal(fused.buffer, [0.25 * v for v in (0, 1, 2, 3, 4, 5, 1, 2)] + [9])  # not the extra slot
    assert fused.matches(grads) and not fused.matches({"W": grads["W"]})
    assert not fused.matches({**grads, "b": np.ones(3)}) and not fused.matches({k: v.astype(np.float32) for k, v in grads.items()})


@pytest.mark.timeout(60)
def test_a_stop_requested_on_rank_0_stops_every_rank(run_mpi):
    result = run_mpi(3, "solver_stop.py", timeout=30)
    assert result.returncode == 0, result.stderr
    # With unbuffered output (PYTHONUNBUFFERED) print's text and newline are two writes: ranks' lines interleave.
    found = sorted(re.findall(r"rank \d+ stopped at iteration \d+", result.stdout))
    assert found == [f"rank {r} stopped at iteration 4" for r in range(3)], result.stdout


@pytest.mark.timeout(60)
def test_sharded_state_is_gathered_only_for_someone_to_read_it(run_mpi):
    """The whole gradient and optimizer state (a parameter-sized buffer each, on rank 0) are gathered at the 2 epoch
    ends only when a monitor or checkpoint_name exists on some rank (here: rank 0 alone); every rank joins."""
    result = run_mpi(2, "solver_gathers.py", timeout=45)
    assert result.returncode == 0, result.stderr
    found = sorted(re.findall(r"rank \d \w+: \d grads \d configs", result.stdout))
    assert found == sorted(f"rank {r} {run}: {n} grads {n} configs" for r in range(2)
                           for run, n in (("nobody", 0), ("monitor", 2), ("checkpoints", 2))), result.stdout
