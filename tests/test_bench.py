"""The benchmarks in benchmarks/ at minimal sizes: they run, print their tables and write the JSON they promise.

Every benchmark runs as the command it is (`python benchmarks/...`, this checkout first on PYTHONPATH), in a process
group of its own that is killed whole if it outlives its timeout. The figures are not checked.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import run_in_group

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TINY = ["--hidden-dims", "16", "--batch-size", "8", "--dtypes", "float32", "--repeats", "2", "--warmup", "1",
        "--rounds", "1", "--threads", "1"]


def run_script(clean_env, script, *args, timeout=120, prefix=(), **env):
    """Run `[*prefix] python benchmarks/<script> args...` from the checkout with a clean environment (plus `env`);
    return its standard output after checking that it succeeded. Still running after `timeout` seconds, it is killed
    with its whole process group (its workers and MPI ranks too) and the test fails."""
    command = [*prefix, sys.executable, str(BENCHMARKS / script), *map(str, args)]
    result = run_in_group(command, timeout, env=clean_env(**env), cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def run_bench(clean_env, tmp_path, *args, timeout=120):
    """benchmarks/bench.py at the tiny size: (its results JSON, its standard output)."""
    path = tmp_path / "bench.json"
    out = run_script(clean_env, "bench.py", *TINY, *args, "--json", path, timeout=timeout)
    return json.loads(path.read_text()), out


@pytest.fixture
def bench_sections(monkeypatch):
    """benchmarks/ on sys.path, as for a script run from there: `bench_sections` imports."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield
    for name in [name for name in sys.modules if name == "bench_sections" or name.startswith("bench_sections.")]:
        del sys.modules[name]


def test_the_benchmarks_live_outside_the_package():
    assert not (REPO / "dpnet" / "bench").exists() and importlib.util.find_spec("dpnet.bench") is None
    assert not (BENCHMARKS / "__init__.py").exists()  # not a package of dpnet's


def test_step_and_torch_sections(clean_env, tmp_path):
    results, out = run_bench(clean_env, tmp_path, "--sections", "step", "torch", "--rules", "sgd", "adam",
                             "--torch-rules", "adam")
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
    assert "step vs BLAS floor" in out and "dpnet vs PyTorch" in out and "float32 adam" in out
    assert "float32 sgd, hand-written NumPy" in out


def test_the_torch_sections_dpnet_worker(bench_sections, tmp_path):
    """The dpnet side of the torch section runs in a worker process whether or not PyTorch is installed."""
    from bench_sections.workers import run_worker

    spec = dict(framework="dpnet", hidden_dims=[8], batch_size=4, threads=1, dtypes=["float32"], rules=["adam"],
                warmup=1, repeats=2)
    result = run_worker("framework", spec, tmp_path, threads=1)
    assert len(result["times"]["float32 adam"]) == 2 and result["info"] == {}


def test_the_handwritten_reference_computes_dpnets_gradients(bench_sections):
    from bench_sections.step import handwritten_gradients

    from dpnet.classifiers.fc_net import FullyConnectedNet

    model = FullyConnectedNet([7, 5], input_dim=12, num_classes=4, weight_scale=0.3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 12)), rng.integers(4, size=6)
    _, expected = model.loss(X, y)
    L = model.num_layers
    grads = handwritten_gradients([model.params[f"W{i}"] for i in range(1, L + 1)],
                                  [model.params[f"b{i}"] for i in range(1, L + 1)], X, y)
    for i, (dw, db) in zip(range(L, 0, -1), grads):
        np.testing.assert_allclose(dw, expected[f"W{i}"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(db, expected[f"b{i}"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_the_benchmarks_step_is_the_solvers(bench_sections, rule):
    """ExchangeStep (the step the benchmarks time through the public exchange protocol) leaves the parameters the
    Solver leaves after one step on the same batch, bit for bit."""
    from bench_sections.exchange_step import ExchangeStep

    from dpnet.classifiers.fc_net import FullyConnectedNet
    from dpnet.solver import Solver

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 12)), rng.integers(4, size=8)
    ours, theirs = (FullyConnectedNet([6], input_dim=12, num_classes=4, weight_scale=0.3, seed=0) for _ in range(2))
    ExchangeStep(ours, rule, {"learning_rate": 1e-2})(X, y)
    Solver(theirs, dict(X_train=X, y_train=y, X_val=X, y_val=y), update_rule=rule,
           optim_config={"learning_rate": 1e-2}, batch_size=8, num_epochs=1, verbose=False, seed=0).train()
    for name, value in theirs.params.items():
        np.testing.assert_array_equal(ours.params[name], value, err_msg=name)


def test_distributed_section(clean_env, tmp_path, mpiexec):
    results, out = run_bench(clean_env, tmp_path, "--sections", "distributed", "--allreduce-repeats", "2",
                             timeout=240)
    section = results["distributed"]
    assert section["available"] and section["processes"] == 2
    assert section["serial_step_ms"] > 0
    for key in ("fused_ms", "pickled_ms", "fused_speedup"):
        assert section[key] > 0, key
    cases = section["cases"]
    assert sorted(cases) == ["replicated", "replicated_mpi", "sharded", "sharded_mpi"]
    for name, case in cases.items():
        assert all(case[k] > 0 for k in ("step_ms", "speedup", "comm_share", "comm_ms", "reduce_share")), name
        # on this one machine shared memory is used unless the case asks for MPI only
        assert case["shared_memory"] == (not name.endswith("_mpi")), name
    ranks = section["runs"]["sharded"][0]
    assert [rank["rank"] for rank in ranks] == [0, 1] and all(len(rank["comm"]) == 2 for rank in ranks)
    assert "1 vs P processes" in out and "fused vs pickled" in out and "exchange.reduce" in out


def test_memory_section_without_data_says_what_it_needs(clean_env, tmp_path):
    results, out = run_bench(clean_env, tmp_path, "--sections", "memory", "--data-dir", tmp_path / "nowhere")
    assert not results["memory"]["available"] and "--data-dir" in results["memory"]["note"]
    assert "needs CIFAR-10: give --data-dir" in out


def test_memory_section(clean_env, tmp_path, cifar10_dir, mpiexec):
    results, out = run_bench(clean_env, tmp_path, "--sections", "memory", "--data-dir", cifar10_dir,
                             "--memory-hidden-dims", "16", "--memory-steps", "2", "--memory-processes", "1", "2",
                             timeout=300)
    jobs = results["memory"]["jobs"]
    assert sorted(jobs) == ["1", "2", "2-replicated", "2-unshared"]  # the default recipe shards; the others compare
    assert [len(jobs[p]["ranks"]) for p in ("1", "2", "2-replicated", "2-unshared")] == [1, 2, 2, 2]
    assert jobs["2"]["shard_optimizer"] and not jobs["2-replicated"]["shard_optimizer"]
    assert jobs["2"]["shared_memory"] and not jobs["2-unshared"]["shared_memory"]
    assert jobs["2-unshared"]["shard_optimizer"]
    for rank in jobs["2"]["ranks"]:
        assert rank["steps"] == 2 and rank["peak_rss_mb"] > rank["pss_mb"] > 0  # the shared data counts once
        assert 0 < rank["training_peak_pss_mb"] <= rank["peak_pss_mb"]
    assert jobs["1"]["pss_ratio"] == 1 and jobs["2"]["pss_ratio"] > 1 and jobs["2"]["training_pss_ratio"] > 1
    assert 0 < jobs["2"]["total_training_peak_pss_mb"] <= jobs["2"]["total_peak_pss_mb"]
    assert 0 < jobs["2"]["per_extra_process_mb"] < jobs["2"]["total_peak_pss_mb"]
    assert 175 < results["memory"]["dataset_mb"] < 176  # 60000 images of 3072 bytes (MiB)
    assert "memory (CIFAR-10)" in out and "each process beyond the first" in out


def test_recipe_step_benchmark_runs(clean_env, cifar10_dir):
    """benchmarks/bench_recipe_step.py, tiny, one variant on this checkout: a job trains the default recipe on the
    real CIFAR-10 and the table has its row."""
    out = run_script(clean_env, "bench_recipe_step.py", "--data-dir", cifar10_dir, "--steps", "3", "--warmup", "1",
                     "--rounds", "1", "--variant", "one=.:1", timeout=300)
    lines = out.splitlines()
    assert lines[0].startswith("default recipe step, medians of 1 x 2 steps; ")
    assert lines[1].split() == ["variant", "ms/step", "images/s", "vs", "one"]
    name, ms, images, ratio = lines[2].split()
    assert name == "one" and float(ms) > 0 and float(images) > 0 and ratio == "1.000"


def test_recipe_benchmark_runs(clean_env, cifar10_dir, mpiexec, tmp_path):
    """benchmarks/bench_recipe.py, tiny: dpnet on 1 and 2 processes (PyTorch too when it is installed, else its rows
    say how to install it); every row has images/s and the phases, and the JSON holds each step's record."""
    path = tmp_path / "recipe.json"
    out = run_script(clean_env, "bench_recipe.py", "--data-dir", cifar10_dir, "--steps", "4", "--warmup", "1",
                     "--rounds", "1", "--processes", "1", "2", "--json", path, timeout=300)
    results = json.loads(path.read_text())
    assert list(results["summary"]) == ["dpnet x1", "pytorch x1", "dpnet x2", "pytorch x2"]
    torch_installed = importlib.util.find_spec("torch") is not None
    for name, row in results["summary"].items():
        if name.startswith("pytorch") and not torch_installed:
            assert "pip install torch==2.13.0" in row["hint"] and name + " " * (16 - len(name)) + "PyTorch" in out
            continue
        assert row["images_per_sec"] > 0 and row["wall"] > 0
        assert len(results["steps"][name]) == 2  # 4 steps: 3 gaps between step ends, 1 left out
        for step in results["steps"][name]:
            phases = sum(step[p] for p in ("batch", "gradients", "exchange", "update", "bookkeeping"))
            assert step["wall"] == pytest.approx(phases) and min(step["batch"], step["gradients"]) > 0
    assert re.search(r"^dpnet 2 processes / 1: \d+\.\d\dx$", out, flags=re.M)
    assert results["environment"]["cpu"] in out


def test_run_time_benchmark_runs(clean_env, cifar10_dir, dpnet_cache_dir):
    """benchmarks/bench_run_time.py, tiny: two cases of whole runs, alternating; a row each with its times."""
    small = "--num-train,512,--batch-size,128,--hidden-dims,16,--blas-threads,1"
    out = run_script(clean_env, "bench_run_time.py", "--data-dir", cifar10_dir, "--epochs", "2", "--rounds", "1",
                     "--case", f"plain=.:{small}", "--case", f"flips=.:{small},--test-flips", "--full-epochs",
                     "flips=10", timeout=300, DPNET_CACHE_DIR=str(dpnet_cache_dir))
    lines = out.splitlines()
    assert lines[0].startswith("whole runs of 2 epochs, 1 rounds; ")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"plain", "flips"}
    for name, (first, epoch, full, unit) in rows.items():
        assert float(first) > 0 and float(epoch) > 0 and unit == "min"
    first, epoch = float(rows["flips"][0]), float(rows["flips"][1])
    assert float(rows["flips"][2]) == pytest.approx((first + 9 * epoch) / 60, abs=0.06)


def test_shared_sum_benchmark_runs(clean_env, mpiexec):
    """benchmarks/bench_shared_sum.py, tiny: it measures the three ways and prints them."""
    out = run_script(clean_env, "bench_shared_sum.py", "--megabytes", "0.1", "--repeats", "3", "--warmup", "1",
                     prefix=(mpiexec, "-n", "2"), timeout=60, OPENBLAS_NUM_THREADS="1")
    lines = out.splitlines()
    assert lines[0].startswith("2 processes, 0.1 MB of float32 each") and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["shared", "reduce-scatter", "scale"]


def test_weight_decay_benchmark_runs(clean_env):
    """benchmarks/bench_weight_decay.py, tiny: both Solvers train in turns and the medians are printed."""
    out = run_script(clean_env, "bench_weight_decay.py", "--hidden-dims", "8", "--steps", "2", "--warmup", "1",
                     "--rounds", "2", "--threads", "1")
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("sgd_momentum, FullyConnectedNet([8]), batch 256, weight decay 0.005")
    assert "inside the rule's pass" in lines[1] and "a pass of its own" in lines[2] and lines[3].startswith("  ratio")


def test_phases_benchmark_runs(clean_env):
    """benchmarks/bench_phases.py, tiny: dpnet's two phases are timed in a worker (PyTorch's too when installed)."""
    out = run_script(clean_env, "bench_phases.py", "--dtype", "float32", "--rule", "adam", "--threads", "1",
                     "--steps", "2", "--rounds", "1")
    row = next(line for line in out.splitlines() if line.startswith("dpnet "))
    forward_backward, update = float(row.split()[2]), float(row.split()[5])
    assert forward_backward > 0 and update > 0
    if importlib.util.find_spec("torch") is None:
        assert "PyTorch is not installed (pip install torch==2.13.0): dpnet only" in out


def test_update_kernels_benchmark_runs(clean_env):
    """benchmarks/bench_update_kernels.py, tiny, with dpnet's own kernel (numexpr is optional: without it, its row says
    how to install it): the step is timed in a worker process and the update agrees with itself exactly."""
    out = run_script(clean_env, "bench_update_kernels.py", "--kernels", "numpy", "numexpr", "--dtypes", "float64",
                     "--rules", "adam", "--rounds", "1", "--steps", "2", "--warmup", "1", timeout=180)
    lines = out.splitlines()
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


def test_update_and_batchnorm_benchmarks_run(clean_env):
    """benchmarks/bench_update.py and bench_batchnorm.py, tiny: a row per rule, a row per dtype."""
    out = run_script(clean_env, "bench_update.py", "--hidden-dims", "8", "8", "--rules", "sgd", "adam",
                     "--repeats", "2")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["sgd", "adam"]
    assert all(f"{variant} " in out for variant in ("pure", "whole", "blocks", "blocks x2"))
    out = run_script(clean_env, "bench_batchnorm.py", "--shape", "8", "4", "--repeats", "2")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["float32", "float64"]
