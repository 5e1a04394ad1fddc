"""The plugin guide's layers, block and model (docs/plugins.md, "A layer with weights", "A block", "A model"): its
example docs/examples/dpnet-resmlp is printed in the guide verbatim, installs with pip into a fresh environment, passes
its own tests, trains from Python and from a TOML `layers` spec on the command line, resumes from its checkpoint, and
trains on 2 and 3 processes to what one process gives, its layer with synchronized state included.

Runs are subprocesses of that environment's Python; a run still going after its timeout is killed with its whole
process group (no orphaned ranks) and fails the test.
"""

import json
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from guide import example_files, printed_files
from processes import run_in_group

from dpnet.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE = EXAMPLES / "dpnet-resmlp"
LAYERS = ["resmlp_block", "resmlp_center", "resmlp_prelu"]

# The network of the guide's "Use it", as the guide spells it in TOML and with --layers (the test checks it does).
TOML_LAYERS = """\
layers = [{layer = "affine", units = 64}, "resmlp_prelu", "resmlp_center", {layer = "resmlp_block", expansion = 2},
          "layernorm", {layer = "affine", units = 10}]
"""
SPEC = [{"layer": "affine", "units": 64}, "resmlp_prelu", "resmlp_center", {"layer": "resmlp_block", "expansion": 2},
        "layernorm", {"layer": "affine", "units": 10}]
CLI_LAYERS = "affine:units=64,resmlp_prelu,resmlp_center,resmlp_block:expansion=2,layernorm,affine:units=10"
# tests/test_train.py's small float64 recipe, without its FullyConnectedNet flags (--hidden-dims, --weight-scale),
# which `layers` replaces.
SMALL = ["--num-train", "1000", "--batch-size", "100", "--dtype", "float64", "--seed", "3", "--lr", "2e-3",
         "--lr-decay", "0.9", "--update-rule", "adam", "--lr-schedule", "exponential", "--warmup-epochs", "0",
         "--weight-decay", "0", "--label-smoothing", "0", "--no-augment", "--reg", "1e-4", "--zca", "0", "--ema", "0",
         "--no-test-flips"]
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_", "DPNET_DISABLE_PLUGIN")
_SCRUBBED = ("DPNET_FAULT_INJECT", "DPNET_DATA_DIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ----------------------------------------------------------------------------------------------- the guide
def test_guide_prints_every_file_of_the_example_exactly():
    """docs/plugins.md and docs/examples/dpnet-resmlp cannot drift: a plugin author copying the guide gets the
    example, which the tests below install and run."""
    printed, example = printed_files("example file"), example_files(EXAMPLE)
    assert sorted(printed) == sorted(example)
    for path, text in example.items():
        assert printed[path] == text, f"docs/plugins.md prints a different {path} than docs/examples/{path}"


def test_guide_states_the_layer_contract():
    text = GUIDE.read_text()
    for needle in ('Layer(name, "layer", forward, backward, init=init)',
                   "`init(in_dim, rng, dtype, **options) -> (params, out_dim)`",
                   "`forward(x, params, state) -> (out, cache)`", "`backward(dout, cache) -> (dx, grads)`",
                   '`"mode"`', '`"options"`', '`"rng"`', '`"reducer"`', "saved in checkpoints",
                   "`count / n_local`", "`need_dx=False`", "`grads_out`", "`dpnet_models()`",
                   '`"<layer><k>.<param>"`', "`check_model(", "init.check_in_dim", "init.check_options",
                   "--model resmlp --model-option width=512", "[model-options]", "--resume runs/<run>/last.npz",
                   "## A layer with weights", "## A block", "## A model", TOML_LAYERS, "--layers " + CLI_LAYERS):
        assert needle in text, needle


def _printed_parameter_names():
    """The parameter names the guide prints under "Use it" (test_trains_from_python checks them)."""
    block = re.search(r">>> list\(model\.params\)\n(\[.*?\])\n>>>", GUIDE.read_text(), re.S).group(1)
    return json.loads(block.replace("'", '"'))


# ----------------------------------------------------------------------------------------------- the environment
def _env(cache, **extra):
    """This environment without launcher, plugin-disabling or thread-count variables, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES) and k not in _SCRUBBED}
    env.update(DPNET_CACHE_DIR=str(cache), DPNET_BLAS_THREADS="1", **extra)
    return env


def _run(command, *, cwd, env, timeout=300):
    """Run `command` in a process group of its own (killed whole on every exit path); one still running after
    `timeout` seconds fails the test."""
    return run_in_group([str(c) for c in command], timeout, cwd=cwd, env=env)


def _ok(command, **kwargs):
    result = _run(command, **kwargs)
    assert result.returncode == 0, \
        f"exit {result.returncode}: {' '.join(result.args)}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


class Venv:
    """A fresh virtualenv that sees this environment's packages and has the example pip-installed."""

    def __init__(self, root, cache):
        self.root, self.cache = root, cache
        self.python = root / "venv" / "bin" / "python"
        self.source = root / "dpnet-resmlp"

    def run(self, *args, timeout=300, cwd=None, **env):
        return _run([self.python, *args], cwd=cwd or self.root, env=_env(self.cache, **env), timeout=timeout)

    def ok(self, *args, timeout=300, cwd=None, **env):
        return _ok([self.python, *args], cwd=cwd or self.root, env=_env(self.cache, **env), timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory, dpnet_cache_dir):
    """The guide's example installed with pip as a user would (a wheel build; no network: --no-deps,
    --no-build-isolation) into a fresh virtualenv that sees this environment's packages (dpnet, numpy, pluggy,
    pytest, mpi4py) through a .pth file."""
    root = tmp_path_factory.mktemp("guide-layers")
    env = Venv(root, dpnet_cache_dir)
    _ok([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root, env=_env(dpnet_cache_dir),
        timeout=120)
    purelib = _ok([env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                  env=_env(dpnet_cache_dir), timeout=60).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    Path(purelib, "_dpnet_test_parent_env.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    shutil.copytree(EXAMPLE, env.source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    _ok([sys.executable, "-m", "pip", "--python", env.python, "install", "--no-deps", "--no-build-isolation",
         "--no-input", "--disable-pip-version-check", "--quiet", env.source], cwd=root, env=_env(dpnet_cache_dir),
        timeout=300)
    return env


# ----------------------------------------------------------------------------------------------- installed
@pytest.mark.timeout(600)
def test_installed_example_is_listed_and_passes_its_own_tests(venv):
    """`python -m dpnet.plugins --json` lists its three layers and its model (next to whatever else is installed,
    without a name clash); the example's tests (check_plugin, check_layer with options, check_model on a Sequential
    and on the model of its hook, the centering's values, a training run) pass in the installed environment."""
    listing = json.loads(venv.ok("-m", "dpnet.plugins", "--json").stdout)
    assert listing["errors"] == []
    plugin = {p["name"]: p for p in listing["plugins"]}["resmlp"]
    assert (plugin["distribution"], plugin["version"], plugin["status"]) == ("dpnet-resmlp", "0.1.0", "loaded")
    assert plugin["layers"]["layer"] == LAYERS and plugin["models"] == ["resmlp"]
    assert plugin["update_rules"] == [] and not any(plugin["layers"][k] for k in ("activation", "normalization",
                                                                                   "loss"))
    where = venv.ok("-c", "import dpnet_resmlp; print(dpnet_resmlp.__file__)").stdout
    assert "site-packages" in where, where  # installed, not found in the source tree

    ini = venv.root / "pytest.ini"
    ini.write_text("[pytest]\n")
    result = venv.ok("-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", ini, "--rootdir", venv.root,
                     venv.source / "tests")
    assert "5 passed" in result.stdout, result.stdout


TRAIN_FROM_PYTHON = """
import json, sys
import numpy as np
from dpnet.data_utils import get_CIFAR10_data
from dpnet.models import Sequential
from dpnet.solver import Solver

spec = json.loads(sys.argv[2])
guide = Sequential(spec, seed=0)  # the network of the guide's "Use it", as printed there
data = get_CIFAR10_data(num_training=1000, num_validation=200, num_test=200, data_dir=sys.argv[1])
model = Sequential([{"layer": "affine", "units": 32}, "resmlp_prelu", "resmlp_center",
                    {"layer": "resmlp_block", "expansion": 2}, "layernorm", {"layer": "affine", "units": 10}], seed=0)
solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3}, batch_size=100,
                num_epochs=2, verbose=False, seed=0)
solver.train()
print(json.dumps({"names": list(guide.params), "loss": solver.loss_history, "val_acc": solver.best_val_acc,
                  "test_acc": solver.check_accuracy(data["X_test"], data["y_test"]),
                  "state": sorted(k for k, v in model.bn_params[2].items() if isinstance(v, np.ndarray)),
                  "dtypes": sorted({str(v.dtype) for v in model.params.values()})}))
"""


@pytest.mark.timeout(300)
def test_trains_from_python(venv, cifar10_dir):
    """A Sequential of the plugin's layers trains on real CIFAR-10 from Python, the centering keeps its running mean
    in its state, and the guide's parameter names are those Sequential gives."""
    guide_spec = [{"layer": "affine", "units": 512}, "resmlp_prelu", "resmlp_center",
                  {"layer": "resmlp_block", "expansion": 2}, {"layer": "resmlp_block", "expansion": 2},
                  "layernorm", {"layer": "affine", "units": 10}]
    assert ("model = Sequential([{\"layer\": \"affine\", \"units\": 512}, \"resmlp_prelu\", \"resmlp_center\",\n"
            "                    {\"layer\": \"resmlp_block\", \"expansion\": 2}, {\"layer\": \"resmlp_block\", "
            "\"expansion\": 2},\n                    \"layernorm\", {\"layer\": \"affine\", \"units\": 10}], seed=0)"
            ) in GUIDE.read_text()
    out = json.loads(venv.ok("-c", TRAIN_FROM_PYTHON, cifar10_dir, json.dumps(guide_spec)).stdout)
    assert out["names"] == _printed_parameter_names()
    assert out["state"] == ["running_mean"] and out["dtypes"] == ["float32"]
    losses = out["loss"]
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert out["val_acc"] > 0.15 and out["test_acc"] > 0.15, out


# ----------------------------------------------------------------------------------------------- command line
def _accuracy(result):
    found = re.findall(r"^test accuracy (\d\.\d+) ", result.stdout, flags=re.M)
    assert len(found) == 1, result.stdout + result.stderr
    return float(found[0])


def _same_checkpoints(path_a, path_b, tol=1e-12):
    (a, meta_a), (b, meta_b) = load_checkpoint(path_a), load_checkpoint(path_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        scale = max(1.0, float(np.max(np.abs(a[key])))) if a[key].size else 1.0
        assert np.max(np.abs(a[key] - b[key]), initial=0) <= tol * scale, key
    for key in ("epoch", "iteration", "best_val_acc", "val_acc_history"):
        assert meta_a[key] == meta_b[key], key
    return a, meta_a


@pytest.mark.timeout(600)
def test_trains_from_a_toml_layers_spec_and_resumes(venv, cifar10_dir, tmp_path):
    """`python -m dpnet.train --config` with the guide's TOML `layers` of the plugin's layers trains on real CIFAR-10;
    the checkpoint holds the spec and the centering's running mean; resumed after 2 epochs for a 3rd, the run ends
    where 3 uninterrupted epochs end (parameters, running mean, optimizer state, accuracies)."""
    config = tmp_path / "resmlp.toml"
    config.write_text(TOML_LAYERS)
    common = ["-m", "dpnet.train", "--config", config, "--data-dir", cifar10_dir, *SMALL, "--quiet"]
    straight = venv.ok(*common, "--epochs", "3", "--logdir", tmp_path / "straight", cwd=tmp_path)
    assert _accuracy(straight) > 0.2
    first = venv.ok(*common, "--epochs", "2", "--logdir", tmp_path / "resumed", cwd=tmp_path)
    assert _accuracy(first) > 0
    arrays, meta = load_checkpoint(tmp_path / "resumed" / "last.npz")
    assert meta["epoch"] == 2 and meta["config"]["layers"] == SPEC
    assert arrays["norm/2/running_mean"].shape == (64,) and np.abs(arrays["norm/2/running_mean"]).max() > 0
    assert "param/resmlp_prelu1.alpha" in arrays and "param/resmlp_block1.W2" in arrays
    assert "layers = " in (tmp_path / "resumed" / "config.toml").read_text()

    resumed = venv.ok("-m", "dpnet.train", "--resume", tmp_path / "resumed" / "last.npz", "--epochs", "3",
                      "--quiet", cwd=tmp_path)
    _, meta = _same_checkpoints(tmp_path / "resumed" / "last.npz", tmp_path / "straight" / "last.npz")
    assert meta["epoch"] == 3
    assert _accuracy(resumed) == _accuracy(straight)


@pytest.mark.timeout(600)
def test_trains_from_compact_layers_and_from_the_model_hook(venv, cifar10_dir, tmp_path):
    """`--layers` in the guide's compact form, and `--model resmlp --model-option ...` (the plugin's dpnet_models
    factory), each train a run whose checkpoint has the plugin's parameters."""
    common = ["-m", "dpnet.train", "--data-dir", cifar10_dir, "--num-train", "500", "--batch-size", "100",
              "--epochs", "1", "--quiet", "--zca", "0"]
    layers = venv.ok(*common, "--layers", CLI_LAYERS, "--logdir", tmp_path / "layers", cwd=tmp_path)
    assert _accuracy(layers) > 0
    arrays, meta = load_checkpoint(tmp_path / "layers" / "last.npz")
    assert meta["config"]["layers"] == SPEC and arrays["param/affine1.W"].shape == (3072, 64)

    model = venv.ok(*common, "--model", "resmlp", "--model-option", "width=32", "--model-option", "blocks=3",
                    "--logdir", tmp_path / "model", cwd=tmp_path)
    assert _accuracy(model) > 0
    arrays, meta = load_checkpoint(tmp_path / "model" / "last.npz")
    assert meta["config"]["model"] == "resmlp" and meta["config"]["model_options"] == {"width": 32, "blocks": 3}
    assert arrays["param/resmlp_block3.W1"].shape == (32, 64) and arrays["param/resmlp_block3.W1"].dtype == np.float32
    assert "param/resmlp_block4.W1" not in arrays and arrays["norm/2/running_mean"].shape == (32,)


# ----------------------------------------------------------------------------------------------- processes
# Trains a float64 Sequential with the plugin's layers (PReLU's weights, the centering's state over the global batch)
# on this process's communicator and saves, on rank 0, what training gives. A global batch of 31 is split 16 + 15 on
# 2 processes and 10 + 10 + 11 on 3.
AGREEMENT = """
import sys
import numpy as np
from dpnet.models import Sequential
from dpnet.solver import Solver

rng = np.random.default_rng(0)
X = rng.standard_normal((133, 12))
y = (X[:, 0] * X[:, 1] + X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 0.5)
data = {"X_train": X[:93], "y_train": y[:93], "X_val": X[93:], "y_val": y[93:]}
model = Sequential([{"layer": "affine", "units": 16}, "resmlp_prelu", {"layer": "resmlp_center", "momentum": 0.8},
                    {"layer": "resmlp_block", "expansion": 2}, {"layer": "affine", "units": 3}],
                   input_dim=(12,), reg=1e-3, dtype=np.float64, seed=0)
solver = Solver(model, data, update_rule="sgd_momentum", optim_config={"learning_rate": 0.05}, batch_size=31,
                num_epochs=4, verbose=False, seed=0)
solver.train()
center = model.bn_params[2]
out = {"processes": np.array(solver.comm.size), "synchronized": np.array(center.get("reducer") is not None),
       "loss": np.array(solver.loss_history), "val_acc": np.array(solver.val_acc_history)}
for which in ("best", "final"):
    solver.use_params(which)
    out.update({f"{which}/param/{k}": v.copy() for k, v in model.params.items()})
    out.update({f"{which}/state/{i}/{k}": v.copy() for i, s in enumerate(model.bn_params) for k, v in s.items()
                if isinstance(v, np.ndarray)})
    out[f"{which}/scores"] = model.loss(data["X_val"])
if solver.comm.rank == 0:
    np.savez(sys.argv[1], **out)
"""


@pytest.mark.timeout(600)
def test_two_and_three_processes_compute_what_one_does(venv, mpiexec, tmp_path):
    """Under `mpiexec -n 2` and `-n 3` (uneven shards), the same seed and global batch give the parameters, the
    centering's running mean and the test-mode scores of one process (best and final), and the same losses, to 1e-10
    relative: the centering's mean is that of the global batch (through the reducer, which only the multi-process
    runs have) and its backward pass rescales the shards' gradients exactly."""
    script = tmp_path / "agreement.py"
    script.write_text(AGREEMENT)
    venv.ok(script, tmp_path / "one.npz", timeout=120)
    one = dict(np.load(tmp_path / "one.npz"))
    assert not one["synchronized"] and "best/state/2/running_mean" in one and "final/param/resmlp_prelu1.alpha" in one
    assert len(one["loss"]) == 12
    # mpi4py looks for libmpi in the running environment's prefix; the mpich wheel's is in this environment's.
    libs = os.pathsep.join([str(Path(sys.exec_prefix) / "lib"), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    for n in (2, 3):
        result = _ok([mpiexec, "-n", n, venv.python, script, tmp_path / f"n{n}.npz"], cwd=tmp_path,
                     env=_env(venv.cache, LD_LIBRARY_PATH=libs), timeout=180)
        many = dict(np.load(tmp_path / f"n{n}.npz"))
        assert many["processes"] == n and many["synchronized"], result.stdout + result.stderr
        assert sorted(many) == sorted(one)
        assert np.array_equal(many["val_acc"], one["val_acc"]), n
        for key in sorted(k for k in one if k not in ("processes", "synchronized", "val_acc")):
            a, b = one[key], many[key]
            assert a.shape == b.shape and a.dtype == b.dtype == np.float64, key
            scale = float(np.max(np.abs(a)))
            assert scale > 0 and np.max(np.abs(a - b)) <= 1e-10 * scale, (n, key, np.max(np.abs(a - b)) / scale)
