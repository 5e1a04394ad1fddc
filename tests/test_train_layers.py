"""`python -m dpnet.train` with an architecture other than the FullyConnectedNet: `--layers` / TOML `layers` (a
dpnet.models.Sequential), `--model` (a plugin's dpnet_models hook) with `--model-option`, and the update rule's
hyper-parameters from `--optim` / TOML `[optim]`.

Bad input runs in this process (it fails before training); training runs are subprocesses, on a slice of the real
CIFAR-10, with the helpers of tests/test_train.py.
"""

import os
import re
import signal
import tomllib

import numpy as np
import pytest
from processes import run_main
from scripts import load_test_module

from dpnet import config as dpconfig
from dpnet import config_checks, train

_helpers = load_test_module("test_train")
KILLER, REPO, cli, run_ok, checkpoint = (getattr(_helpers, name) for name in
                                         ("KILLER", "REPO", "cli", "run_ok", "checkpoint"))
assert_same_state, printed_accuracy = _helpers.assert_same_state, _helpers.printed_accuracy

# The small recipe of tests/test_train.py without its FullyConnectedNet flags: 10 iterations per epoch, float64.
SMALL = ["--num-train", "1000", "--batch-size", "100", "--epochs", "3", "--dtype", "float64", "--seed", "3",
         "--lr", "2e-3", "--lr-decay", "0.9", "--lr-schedule", "exponential", "--warmup-epochs", "0",
         "--weight-decay", "0", "--label-smoothing", "0", "--no-augment", "--reg", "1e-4", "--zca", "0", "--ema", "0",
         "--no-test-flips"]
SPEC_TOML = ('layers = [{layer = "affine", units = 40}, "batchnorm", "relu", {layer = "dropout", keep = 0.8}, '
             '{layer = "affine", units = 10}]\nupdate-rule = "adam"\n\n[optim]\nbeta2 = 0.99\n')
SPEC = [{"layer": "affine", "units": 40}, "batchnorm", "relu", {"layer": "dropout", "keep": 0.8},
        {"layer": "affine", "units": 10}]
SPEC_TEXT = "affine:units=40,batchnorm,relu,dropout:keep=0.8,affine:units=10"


pytestmark = pytest.mark.usefixtures("restore_blas_threads")  # main() in this process limits the BLAS pool


def _main(argv, capsys):
    """train.main in this process: (exit code, stderr)."""
    return run_main(train.main, argv, capsys)


def _toml(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _bad(argv, expected, tmp_path, monkeypatch, capsys):
    """argv ends with exit code 2 and one message containing every `expected` string; nothing is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPNET_DATA_DIR", str(tmp_path / "no-data"))  # never download
    monkeypatch.setenv("DPNET_CACHE_DIR", str(tmp_path / "cache"))
    before = set(tmp_path.rglob("*"))
    code, err = _main([*argv, "--logdir", tmp_path / "logs"], capsys)
    assert code == 2, err
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in err, err
    assert len(re.findall("error", err)) == 1 and "Traceback" not in err, err
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "cache"}, "nothing is written before the input is checked"
    return err


# ----------------------------------------------------------------------------------------------- bad input
BAD = {
    "layers and hidden-dims": (
        ["--layers", SPEC_TEXT, "--hidden-dims", "40"],
        "--layers cannot be combined with --hidden-dims: --layers gives the network layer by layer, in place of the "
        "FullyConnectedNet of --hidden-dims, --activation, --normalization, --dropout, --weight-scale; give the "
        "architecture one way"),
    "layers in TOML and --dropout": (
        lambda t: ["--config", _toml(t, SPEC_TOML), "--dropout", "0.5", "--normalization", "none"],
        lambda t: f"--layers (in {t / 'run.toml'}) cannot be combined with --normalization, --dropout: "),
    "layers and activation in one TOML": (
        lambda t: ["--config", _toml(t, 'activation = "relu"\n' + SPEC_TOML)],
        lambda t: f"--layers (in {t / 'run.toml'}) cannot be combined with --activation (in {t / 'run.toml'})"),
    "layers and weight-scale": (["--layers", SPEC_TEXT, "--weight-scale", "0.1"],
                                "--layers cannot be combined with --weight-scale"),
    "malformed layers": (
        ["--layers", "affine:units=40,,relu"],
        "argument --layers: malformed layer spec 'affine:units=40,,relu': expected a layer name at character 17, "
        "found ',' (the form is NAME[:KEY=VALUE...][,NAME[:KEY=VALUE...]...], e.g. "),
    "layers option without value": (["--layers", "affine:units,relu"],
                                    "malformed layer spec 'affine:units,relu': expected '=' after the option units"),
    "layers unterminated string": (["--layers", 'affine:units="40'], "malformed layer spec 'affine:units=\"40'"),
    "unknown layer": (["--layers", "affine:units=40,rleu,affine:units=10"],
                      ["--layers: unknown layer 'rleu'; did you mean 'relu'", "Available layers: ", "affine"]),
    "TOML layers not names": (lambda t: ["--config", _toml(t, 'layers = [3, "relu"]\n')],
                              "layers[0] must be a layer name or an inline table with a layer name"),
    "TOML layer option not a scalar": (
        lambda t: ["--config", _toml(t, 'layers = [{layer = "affine", units = [40]}]\n')],
        "layers[0] (affine): option units must be a boolean, number or string, got [40]"),
    "TOML layers empty": (lambda t: ["--config", _toml(t, "layers = []\n")], "layers must be an array of layer names"),
    "unknown optim key": (
        ["--update-rule", "adam", "--optim", "beta3=0.9"],
        "unknown --optim key 'beta3' for the update rule 'adam'; it accepts: beta1 (default 0.9), beta2 (default "
        "0.999), epsilon (default 1e-08)"),
    "optim state is no hyper-parameter": (["--update-rule", "adam", "--optim", "t=3"],
                                          "unknown --optim key 't' for the update rule 'adam'"),
    "optim key of another rule": (["--optim", "beta2=0.99"],
                                  "unknown --optim key 'beta2' for the update rule 'sgd_momentum'; it accepts: "
                                  "momentum (default 0.9)"),
    "optim bad value": (["--update-rule", "adam", "--optim", "beta2=high"],
                        "--optim beta2 must be a finite number (the update rule 'adam' has beta2 = 0.999 by "
                        "default), got high"),
    "optim bool for a number": (["--optim", "momentum=true"], "--optim momentum must be a finite number"),
    "optim not key=value": (["--optim", "beta2"], "argument --optim: expected KEY=VALUE"),
    "optim learning rate": (["--optim", "learning_rate=0.1"], "--optim learning_rate: the learning rate is --lr"),
    "sgd takes no optim": (["--update-rule", "sgd", "--optim", "momentum=0.9"],
                           "unknown --optim key 'momentum' for the update rule 'sgd'; it accepts: none (besides the "
                           "learning rate, --lr)"),
    "TOML optim not a table": (lambda t: ["--config", _toml(t, "optim = 0.9\n")],
                               "optim must be a table of key = value ([optim] with one key per line), got 0.9"),
    "TOML optim bad value": (lambda t: ["--config", _toml(t, "[optim]\nmomentum = [0.9]\n")],
                             "[optim] momentum must be a boolean, number or string, got [0.9]"),
    "TOML optim unknown key": (lambda t: ["--config", _toml(t, "[optim]\nmomentun = 0.8\n")],
                               "unknown --optim key 'momentun' for the update rule 'sgd_momentum'"),
    "unknown model": (["--model", "fx_nope"], "unknown --model 'fx_nope'; the choices are: "),
    "model and layers": (["--model", "fx_nope", "--layers", SPEC_TEXT],
                         "--model cannot be combined with --layers: --model builds a plugin's network, in place of "
                         "--layers and the FullyConnectedNet of"),
    "model and hidden-dims": (["--model", "fx_nope", "--hidden-dims", "40"],
                              "--model cannot be combined with --hidden-dims"),
    "model option without model": (["--model-option", "width=3"], "--model-option width=3 needs --model"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_ends_with_one_message_and_exit_code_2(case, tmp_path, monkeypatch, capsys):
    args, expected = BAD[case]
    args = args(tmp_path) if callable(args) else args
    _bad(args, expected(tmp_path) if callable(expected) else expected, tmp_path, monkeypatch, capsys)


def test_layer_options_are_checked_when_the_model_is_built(cifar10_dir, dpnet_cache_dir, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    code, err = _main(["--layers", "affine:unitz=40,relu,affine:units=10", *SMALL, "--data-dir", cifar10_dir,
                       "--logdir", tmp_path / "logs"], capsys)
    assert code == 2
    assert ("error: --layers affine:unitz=40,relu,affine:units=10: layer 0 (affine): unknown or missing option(s) "
            "'unitz'; it takes units, weight_scale") in err, err
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------------- the spec's forms
@pytest.mark.parametrize("argv, spec", [
    ([SPEC_TEXT], SPEC),
    (["affine:units=40", "batchnorm,relu", "dropout:keep=0.8", "affine:units=10"], SPEC),  # separate arguments
    ([" affine : units = 40 , relu "], [{"layer": "affine", "units": 40}, "relu"]),
    (['fx_block:width=64:scale=0.5:bias=false:act=gelu:tag="1,2"'],
     [{"layer": "fx_block", "width": 64, "scale": 0.5, "bias": False, "act": "gelu", "tag": "1,2"}]),
    (['x:n=-3:e=1e-3:s="true":u="a b"'], [{"layer": "x", "n": -3, "e": 1e-3, "s": "true", "u": "a b"}]),
])
def test_layers_round_trip_through_config_toml(argv, spec, tmp_path):
    """--layers -> the configuration -> config.toml -> --config gives the same spec; so does its compact form."""
    given = vars(train.build_parser().parse_args(["--layers", *argv]))
    assert given["layers"] == spec
    config, _ = train.resolve_config(given)
    assert config["layers"] == spec and all(config[key] is None for key in dpconfig.FC_KEYS)
    path = _toml(tmp_path, train.to_toml(config), "config.toml")
    with open(path, "rb") as f:
        assert tomllib.load(f)["layers"] == spec
    again, _ = train.resolve_config({"config": str(path)})
    assert again == config
    assert dpconfig.parse_layers(dpconfig.shown(spec)) == spec


def test_optim_and_model_options_round_trip_and_merge_key_by_key(tmp_path):
    path = _toml(tmp_path, 'update-rule = "adam"\n[optim]\nbeta1 = 0.8\nbeta2 = 0.99\n')
    config, _ = train.resolve_config({"config": str(path), "optim": {"beta2": 0.95}})
    assert config["optim"] == {"beta1": 0.8, "beta2": 0.95}  # the flag overrides the file's beta2 only
    train.check_config(config, 1)
    text = train.to_toml(config)
    assert text.endswith("\n[optim]\nbeta1 = 0.8\nbeta2 = 0.95\n"), text
    again, _ = train.resolve_config({"config": str(_toml(tmp_path, text, "config.toml"))})
    assert again["optim"] == config["optim"]

    config, _ = train.resolve_config({"model": "fx_any", "model_options": {"width": 8, "act": "gelu"}})
    text = train.to_toml(config)
    assert "\n[model-options]\nwidth = 8\nact = \"gelu\"\n" in text and "hidden-dims" not in text, text
    again, _ = train.resolve_config({"config": str(_toml(tmp_path, text, "model.toml"))})
    assert (again["model"], again["model_options"]) == ("fx_any", {"width": 8, "act": "gelu"})


def test_optim_values_take_the_defaults_types():
    assert config_checks.optim_options("adam", {"beta2": 1, "epsilon": 1e-7}) == {"beta2": 1.0, "epsilon": 1e-7}
    assert isinstance(config_checks.optim_options("adam", {"beta2": 1})["beta2"], float)


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def layers_run(cifar10_dir, dpnet_cache_dir, tmp_path_factory):
    """3 epochs of a Sequential from a TOML `layers` spec (batchnorm: state; dropout: random masks), adam with
    beta2 from the TOML [optim] table."""
    work = tmp_path_factory.mktemp("layers")
    toml = _toml(work, SPEC_TOML)
    result = run_ok("--config", toml, *SMALL, "--data-dir", cifar10_dir, "--logdir", work / "logs",
                    "--checkpoint-dir", work / "ck", cwd=work, cache=dpnet_cache_dir)
    return result, work


@pytest.mark.timeout(300)
def test_trains_a_layers_spec_from_toml(layers_run):
    result, work = layers_run
    assert printed_accuracy(result) > 0.2  # chance is 0.1
    assert (f"dpnet-train: Sequential {SPEC_TEXT} (123410 parameters, float64); adam lr 0.002 beta2=0.99 decay 0.9"
            in result.stdout), result.stdout
    arrays, meta = checkpoint(work / "ck" / "last.npz")
    assert meta["config"]["layers"] == SPEC and meta["config"]["optim"] == {"beta2": 0.99}
    assert meta["config"]["hidden_dims"] is None and meta["model"] == "Sequential"
    assert arrays["param/affine1.W"].shape == (3072, 40) and arrays["param/affine2.W"].shape == (40, 10)
    assert {"param/batchnorm1.gamma", "norm/1/running_mean", "norm/1/running_var", "optim/affine1.W/v"} <= set(arrays)
    assert meta["optim_scalars"]["affine1.W"]["beta2"] == 0.99
    saved = train.load_toml(work / "logs" / "config.toml")
    assert saved["layers"] == SPEC and saved["optim"] == {"beta2": 0.99} and "hidden_dims" not in saved


@pytest.mark.timeout(300)
def test_resume_of_a_layers_run_after_sigkill_gives_the_uninterrupted_run(layers_run, cifar10_dir, dpnet_cache_dir,
                                                                          tmp_path):
    result, work = layers_run
    toml = _toml(tmp_path, SPEC_TOML)
    args = ["--config", toml, *SMALL, "--data-dir", cifar10_dir, "--logdir", tmp_path / "logs", "--checkpoint-dir",
            tmp_path / "ck"]
    killed = cli(*args, script=KILLER, cwd=tmp_path, cache=dpnet_cache_dir, KILL_AT_ITERATION="25")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = tmp_path / "ck" / "last.npz"
    assert checkpoint(last)[1]["epoch"] == 2

    resumed = run_ok("--resume", last, cwd=tmp_path, cache=dpnet_cache_dir)  # the model rebuilt from the saved spec
    assert "resuming" in resumed.stdout and f"Sequential {SPEC_TEXT}" in resumed.stdout
    assert_same_state(work / "ck" / "last.npz", last)
    assert printed_accuracy(resumed) == printed_accuracy(result)


@pytest.mark.timeout(300)
def test_resume_refuses_another_spec_or_architecture(layers_run, cifar10_dir, dpnet_cache_dir, tmp_path,
                                                     monkeypatch, capsys):
    _, work = layers_run
    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    last = work / "ck" / "last.npz"
    before = last.read_bytes()
    code, err = _main(["--resume", last, "--layers", "affine:units=64,relu,affine:units=10", "--optim",
                       "beta2=0.9"], capsys)
    assert code == 2
    assert (f"--layers affine:units=64,relu,affine:units=10 (the checkpoint has {SPEC_TEXT}); --optim beta2=0.9 "
            f"(the checkpoint has beta2=0.99)") in err, err
    code, err = _main(["--resume", last, "--hidden-dims", "40"], capsys)
    assert code == 2 and "--hidden-dims 40 (the checkpoint has none)" in err, err

    # A checkpoint without a saved configuration, of another Sequential: the model check says what differs.
    from dpnet.checkpoint import save_checkpoint
    from dpnet.models import Sequential
    from dpnet.solver import Solver

    model = Sequential([{"layer": "affine", "units": 20}, "relu", {"layer": "affine", "units": 10}],
                       dtype=np.float64, seed=0)
    X, y = np.zeros((10, 3, 32, 32)), np.arange(10)
    other = save_checkpoint(tmp_path / "other.npz", Solver(model, dict(X_train=X, y_train=y, X_val=X, y_val=y),
                                                           verbose=False))
    code, err = _main(["--resume", other, "--config", _toml(tmp_path, SPEC_TOML), *SMALL, "--data-dir", cifar10_dir,
                       "--logdir", tmp_path / "logs"], capsys)
    assert code == 2 and "does not match the model" in err, err
    assert "affine1.W is float64[3072, 20] in the checkpoint but float64[3072, 40] in the model" in err
    assert "batchnorm1.gamma is in the model but not in the checkpoint" in err
    assert last.read_bytes() == before


# ----------------------------------------------------------------------------------------------- --model
MODEL_BAD = {
    "unknown model, did you mean": (["--model", "fx_mpl"], "unknown --model 'fx_mpl'; did you mean 'fx_mlp'?"),
    "unknown model option": (["--model", "fx_mlp", "--model-option", "widht=8"],
                             "unknown --model-option 'widht' for the model 'fx_mlp'; it takes: width, depth, norm"),
    "model option the run sets": (["--model", "fx_mlp", "--model-option", "dtype=float64"],
                                  "--model-option dtype: the run gives the model its dtype (use --dtype)"),
    "model with layers in TOML": (lambda t: ["--model", "fx_mlp", "--config", _toml(t, SPEC_TOML)],
                                  lambda t: f"--model cannot be combined with --layers (in {t / 'run.toml'})"),
}


@pytest.mark.parametrize("case", MODEL_BAD)
def test_bad_model_input_ends_with_one_message_and_exit_code_2(case, install, tmp_path, monkeypatch, capsys):
    install("models")
    args, expected = MODEL_BAD[case]
    args = args(tmp_path) if callable(args) else args
    _bad(args, expected(tmp_path) if callable(expected) else expected, tmp_path, monkeypatch, capsys)


def test_the_run_gives_the_factory_its_values_and_the_options(install):
    install("models")
    given = vars(train.build_parser().parse_args(["--model", "fx_mlp", "--model-option", "width=8", "--model-option",
                                                  "depth=2", "--dtype", "float64", "--seed", "5", "--reg", "0.25"]))
    config, _ = train.resolve_config(given)
    train.check_config(config, 1)
    model = train.build_model(config)
    assert {value.dtype for value in model.params.values()} == {np.dtype(np.float64)} and model.reg == 0.25
    assert model.params["affine1.W"].shape == (3072, 8) and model.params["affine3.W"].shape == (8, 10)
    again = train.build_model(config)  # the same seed: the same parameters (as a resumed run rebuilds them)
    assert all(np.array_equal(again.params[name], value) for name, value in model.params.items())


@pytest.mark.parametrize("plugin, option, expected", [
    ("models", "width=wide", "error: cannot build the model 'fx_mlp' with width=wide: layer 0 (affine): "),
    ("model_twin", "any=1", "error: the factory of the model 'fx_mlp' returned a NoneType, not a model (an object "
                            "with a dict of parameters `params` and a method `loss`)"),
])
def test_a_model_that_cannot_be_built_is_bad_input(plugin, option, expected, install, cifar10_dir, dpnet_cache_dir,
                                                   tmp_path, monkeypatch, capsys):
    install(plugin)
    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    code, err = _main(["--model", "fx_mlp", "--model-option", option, *SMALL, "--data-dir", cifar10_dir,
                       "--logdir", tmp_path / "logs"], capsys)
    assert code == 2
    assert expected in err, err
    assert not (tmp_path / "logs").exists()


@pytest.mark.timeout(300)
def test_model_from_a_plugin_trains_and_resumes(install, site, cifar10_dir, dpnet_cache_dir, tmp_path):
    install("models")
    env = dict(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    args = ["--model", "fx_mlp", "--model-option", "width=24", "--model-option", "depth=2", "--model-option",
            "norm=true", *SMALL,
            "--data-dir", cifar10_dir, "--logdir", tmp_path / "logs"]
    result = run_ok(*args, "--epochs", "1", cwd=tmp_path, cache=dpnet_cache_dir, **env)
    described = "dpnet-train: model fx_mlp width=24 depth=2 norm=true (Sequential, 74698 parameters, float64)"
    assert described in result.stdout, result.stdout
    arrays, meta = checkpoint(tmp_path / "logs" / "last.npz")
    assert printed_accuracy(result) > 0.1 and meta["loss_history"][-1] < meta["loss_history"][0]
    options = {"width": 24, "depth": 2, "norm": True}
    assert meta["config"]["model"] == "fx_mlp" and meta["config"]["model_options"] == options
    assert sorted(k for k in arrays if k.startswith("param/")) == sorted(
        f"param/{layer}{k}.{p}" for layer, count, names in (("affine", 3, "Wb"), ("batchnorm", 2, ("beta", "gamma")))
        for k in range(1, count + 1) for p in names)
    assert arrays["param/affine1.W"].shape == (3072, 24) and arrays["param/affine1.W"].dtype == np.float64
    saved = train.load_toml(tmp_path / "logs" / "config.toml")
    assert saved["model"] == "fx_mlp" and saved["model_options"] == options

    resumed = run_ok("--resume", tmp_path / "logs" / "last.npz", "--epochs", "2", "--quiet", cwd=tmp_path,
                     cache=dpnet_cache_dir, **env)
    assert checkpoint(tmp_path / "logs" / "last.npz")[1]["epoch"] == 2, resumed.stdout


@pytest.mark.timeout(300)
def test_a_rule_that_is_not_elementwise_is_replicated_and_gives_what_one_process_gives(
        install, site, mpiexec, cifar10_dir, dpnet_cache_dir, tmp_path):
    """The command line shards the update rule's state by default, but only for rules declaring themselves
    elementwise: a rule whose step depends on the whole gradient's norm keeps its whole state on every process, so 2
    processes compute what one computes (float64, the same global batch), state included."""
    install("whole_rule")
    env = dict(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    args = ["--update-rule", "fx_clipped_momentum", "--lr", "0.05", "--num-train", "600", "--batch-size", "100",
            "--zca", "0",
            "--epochs", "2", "--hidden-dims", "20", "--normalization", "none", "--dtype", "float64", "--seed", "3",
            "--data-dir", cifar10_dir, "--quiet"]
    runs = {}
    for n in (1, 2):
        logs = tmp_path / f"n{n}"
        run_ok(*args, "--logdir", logs, cwd=tmp_path, cache=dpnet_cache_dir, mpiexec=mpiexec,
               n=n if n > 1 else None, **env)
        runs[n] = checkpoint(logs / "last.npz")
    (one, _), (two, meta) = runs[1], runs[2]
    assert meta["num_processes"] == 2 and meta["config"]["update_rule"] == "fx_clipped_momentum"
    velocities = [key for key in one if key.startswith("optim/") and key.endswith("/velocity")]
    assert velocities and all(two[key].shape == one[key].shape for key in velocities)  # whole, not a block
    for key in [k for k in one if k.startswith(("param/", "optim/"))]:
        scale = max(np.max(np.abs(one[key])), np.finfo(np.float64).tiny)
        assert np.max(np.abs(two[key] - one[key])) / scale <= 1e-10, key
