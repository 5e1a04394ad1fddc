"""python -m dpnet.bench at minimal sizes: it runs, prints its table and writes the JSON it promises."""

import importlib.util
import json

import numpy as np

from dpnet import bench

TINY = ["--hidden-dims", "16", "--batch-size", "8", "--dtypes", "float32", "--repeats", "2", "--warmup", "1",
        "--rounds", "1", "--threads", "1"]


def _run(tmp_path, *args):
    path = tmp_path / "bench.json"
    bench.main([*TINY, *args, "--json", str(path)])
    return json.loads(path.read_text())


def test_step_and_torch_sections(tmp_path, capsys):
    results = _run(tmp_path, "--sections", "step", "torch", "--rules", "sgd", "adam", "--torch-rules", "adam")
    assert {"environment", "config", "step", "torch"} <= results.keys()
    assert "numpy" in results["environment"] and results["environment"]["load_average"]
    assert [(r["dtype"], r["rule"]) for r in results["step"]] == [("float32", "sgd"), ("float32", "adam")]
    for row in results["step"]:
        assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["ratio"] > 0 and row["samples_per_sec"] > 0
        assert len(row["step_times"]) == len(row["floor_times"]) == 2
        assert (row["rule"] == "sgd") == ("handwritten_ms" in row)
    torch = results["torch"]
    if importlib.util.find_spec("torch") is None:
        assert not torch["available"] and "pip install torch==2.13.0" in torch["rows"][0]["note"]
    else:
        assert torch["rows"][0]["speedup"] > 0 and torch["torch"]["threads"] == 1
    out = capsys.readouterr().out
    assert "step vs BLAS floor" in out and "dpnet vs PyTorch" in out and "float32 adam" in out
    assert "float32 sgd, hand-written NumPy" in out


def test_the_handwritten_reference_computes_dpnets_gradients():
    from dpnet.classifiers.fc_net import FullyConnectedNet

    model = FullyConnectedNet([7, 5], input_dim=12, num_classes=4, weight_scale=0.3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 12)), rng.integers(4, size=6)
    _, expected = model.loss(X, y)
    L = model.num_layers
    grads = bench.handwritten_gradients([model.params[f"W{i}"] for i in range(1, L + 1)],
                                        [model.params[f"b{i}"] for i in range(1, L + 1)], X, y)
    for i, (dw, db) in zip(range(L, 0, -1), grads):
        np.testing.assert_allclose(dw, expected[f"W{i}"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(db, expected[f"b{i}"], rtol=1e-12, atol=1e-15)


def test_distributed_section(tmp_path, mpiexec):
    results = _run(tmp_path, "--sections", "distributed", "--allreduce-repeats", "2")
    section = results["distributed"]
    assert section["available"] and section["processes"] == 2
    assert section["serial_step_ms"] > 0
    for key in ("fused_ms", "pickled_ms", "fused_speedup"):
        assert section[key] > 0, key
    cases = section["cases"]
    assert sorted(cases) == ["replicated", "replicated_mpi", "sharded", "sharded_mpi", "sharded_summed"]
    for name, case in cases.items():
        assert all(case[k] > 0 for k in ("step_ms", "speedup", "comm_share", "comm_ms")), name
        # on this one machine shared memory is used unless the case asks for MPI only
        assert case["shared_memory"] == (not name.endswith("_mpi")), name
        assert case["factored"] == (name == "sharded"), name
    assert cases["replicated_mpi"]["solver_allreduce_share"] > 0 and "solver_allreduce_share" not in cases["sharded"]


def test_memory_section_without_data_says_what_it_needs(tmp_path):
    results = _run(tmp_path, "--sections", "memory", "--data-dir", str(tmp_path / "nowhere"))
    assert not results["memory"]["available"] and "--data-dir" in results["memory"]["note"]


def test_memory_section(tmp_path, cifar10_dir, mpiexec):
    results = _run(tmp_path, "--sections", "memory", "--data-dir", str(cifar10_dir), "--memory-hidden-dims", "16",
                   "--memory-steps", "2", "--memory-processes", "1", "2")
    jobs = results["memory"]["jobs"]
    assert sorted(jobs) == ["1", "2", "2-replicated", "2-unshared"]  # the default recipe shards; the others compare
    assert [len(jobs[p]["ranks"]) for p in ("1", "2", "2-replicated", "2-unshared")] == [1, 2, 2, 2]
    assert jobs["2"]["shard_optimizer"] and not jobs["2-replicated"]["shard_optimizer"]
    assert jobs["2"]["shared_memory"] and not jobs["2-unshared"]["shared_memory"]
    assert jobs["2-unshared"]["shard_optimizer"]
    for rank in jobs["2"]["ranks"]:
        assert rank["steps"] == 2 and rank["peak_rss_mb"] > rank["pss_mb"] > 0  # the shared data counts once
    assert jobs["1"]["pss_ratio"] == 1 and jobs["2"]["pss_ratio"] > 1 and jobs["2"]["training_pss_ratio"] > 1
    assert 0 < jobs["2"]["total_training_peak_pss_mb"] <= jobs["2"]["total_peak_pss_mb"]
    assert 0 < jobs["2"]["per_extra_process_mb"] < jobs["2"]["total_peak_pss_mb"]
    assert 175 < results["memory"]["dataset_mb"] < 176  # 60000 images of 3072 bytes (MiB)


def test_shared_sum_benchmark_runs(mpiexec, clean_env):
    """benchmarks/bench_shared_sum.py, tiny: it measures the three ways and prints them (figures not checked)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shared_sum.py"
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), "--megabytes", "0.1", "--repeats", "3",
                             "--warmup", "1"], env=clean_env(OPENBLAS_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2 processes, 0.1 MB of float32 each") and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["shared", "reduce-scatter", "scale"]


def test_weight_decay_benchmark_runs():
    """benchmarks/bench_weight_decay.py, tiny: both Solvers step and the medians are printed (figures not checked)."""
    import contextlib
    import io
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_weight_decay.py"
    module = runpy.run_path(str(script))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module["main"](["--hidden-dims", "8", "--steps", "2", "--warmup", "1", "--threads", "1"])
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("sgd_momentum, FullyConnectedNet([8]), batch 256, weight decay 0.005")
    assert "inside the rule's pass" in lines[1] and "a pass of its own" in lines[2] and lines[3].startswith("  ratio")


def test_update_kernels_benchmark_runs():
    """benchmarks/bench_update_kernels.py, tiny, with dpnet's own kernel (numexpr is optional: without it, its row says
    how to install it): the step is timed in a worker process and the update agrees with itself exactly."""
    import contextlib
    import importlib.util
    import io
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_update_kernels.py"
    module = runpy.run_path(str(script))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module["main"](["--kernels", "numpy", "numexpr", "--dtypes", "float64", "--rules", "adam", "--rounds", "1",
                        "--steps", "2", "--warmup", "1"])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("FullyConnectedNet([512, 512]), batch 256, 2 BLAS threads; medians of 2 steps x 1")
    numpy_row = lines[2].split()
    assert numpy_row[:3] == ["float64", "adam", "numpy"] and numpy_row[6:8] == ["1.00x", "0.0e+00"]
    update, rest, step = map(float, numpy_row[3:6])
    assert 0 < update < step and 0 < rest < step
    memory = "PSS summed over 1 / 4 processes that imported dpnet and the kernel's package and ran the kernel once: "
    if importlib.util.find_spec("numexpr") is None:
        assert lines[3].startswith(memory + "numpy ") and "numexpr" not in lines[3]
        assert lines[4] == "numexpr: not installed (pip install numexpr)"
    else:
        assert lines[3].split()[:3] == ["float64", "adam", "numexpr"] and float(lines[3].split()[7]) < 1e-12
        assert lines[4].startswith(memory + "numpy ") and ", numexpr " in lines[4]
    memory_line = next(line for line in lines if line.startswith(memory))
    one, four = map(float, memory_line.split("numpy ")[1].split(" MB")[0].split(" / "))
    assert 0 < one < four  # four processes hold more than one
