"""`python -m dpnet.plugins`, and the plugin guide's worked example (docs/plugins.md) installed with pip."""

import json
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from guide import example_files, printed_files
from processes import run_in_group

import dpnet
from dpnet import plugins, registry

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLES = ROOT / "docs" / "examples"
EXAMPLE = EXAMPLES / "dpnet-swish"
pytestmark = pytest.mark.usefixtures("clean_registry")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPNET_DISABLE_PLUGIN")}
    env.update(extra)
    return env


def _run(capsys, *args):
    registry.reset()
    code = plugins.main(list(args))
    return code, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- the listing
def test_table_lists_builtins_and_plugins(install, capsys):
    install("good")
    code, out = _run(capsys)
    assert code == 0
    lines = out.splitlines()
    assert re.match(r"plugin +distribution +version +status +provides$", lines[0])
    assert re.match(rf"dpnet +dpnet +{re.escape(dpnet.__version__)} +built-in +activation: relu", lines[2])
    assert re.search(r" +normalization: batchnorm, layernorm$", out, re.M)
    assert re.search(r" +update rules: adam, rmsprop, sgd, sgd_momentum$", out, re.M)
    good = lines.index(next(line for line in lines if line.startswith("fxgood ")))
    assert re.match(r"fxgood +dpnetfx-good +1\.0 +loaded +activation: fx_softsign$", lines[good])
    assert lines[good + 1:good + 4] == [
        " " * lines[good].index("activation") + text
        for text in ("normalization: fx_scale", "loss: fx_squared", "update rules: fx_signsgd")]


def test_json(install, capsys):
    install("good")
    code, out = _run(capsys, "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["autoload"] is True and listing["errors"] == []
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert listing["plugins"][0]["name"] == "dpnet"
    assert by_name["dpnet"] == {
        "name": "dpnet", "distribution": "dpnet", "version": dpnet.__version__, "module": "dpnet.builtins",
        "builtin": True, "status": "loaded", "reason": "",
        "layers": {"activation": ["relu"], "normalization": ["batchnorm", "layernorm"], "loss": ["softmax", "svm"],
                   "layer": ["affine", "dropout"]},
        "update_rules": ["adam", "rmsprop", "sgd", "sgd_momentum"], "models": []}
    assert by_name["fxgood"] == {
        "name": "fxgood", "distribution": "dpnetfx-good", "version": "1.0", "module": "dpnetfx_good",
        "builtin": False, "status": "loaded", "reason": "",
        "layers": {"activation": ["fx_softsign"], "normalization": ["fx_scale"], "loss": ["fx_squared"], "layer": []},
        "update_rules": ["fx_signsgd"], "models": []}


def test_models_and_layers_of_kind_layer_are_listed(install, capsys):
    install("models")
    code, out = _run(capsys)
    assert code == 0
    assert re.search(r"^ +layer: affine, dropout$", out, re.M), out
    assert re.search(r"^fxmodels +dpnetfx-models +1\.0 +loaded +models: fx_mlp$", out, re.M), out
    code, out = _run(capsys, "--json")
    by_name = {p["name"]: p for p in json.loads(out)["plugins"]}
    assert code == 0 and by_name["fxmodels"]["models"] == ["fx_mlp"]
    assert by_name["fxmodels"]["layers"] == {"activation": [], "normalization": [], "loss": [], "layer": []}


def test_broken_plugins_are_listed_with_their_errors_and_fail_the_command(install, capsys):
    install("good", "hook_raises", "collides_builtin")
    code, out = _run(capsys)
    assert code == 2
    assert re.search(r"^fxgood +dpnetfx-good +1\.0 +loaded +activation: fx_softsign$", out, re.M)
    assert re.search(r"^fxhookraises +dpnetfx-hook-raises +1\.0 +error +\(failed to load: see below\)$", out, re.M)
    errors = out.split("\nerrors:\n")[1]
    assert ("- plugin 'fxhookraises' (distribution dpnetfx-hook-raises 1.0, entry point dpnet: fxhookraises = "
            "dpnetfx_hook_raises) raised in its dpnet_layers hook: RuntimeError: the layer table is corrupt.") in errors
    assert "- plugin 'fxrelu' (distribution dpnetfx-collides-builtin 1.0" in errors
    assert "provides activation 'relu', which collides with a built-in" in errors

    code, out = _run(capsys, "--json")
    assert code == 2
    listing = json.loads(out)
    statuses = {p["name"]: p["status"] for p in listing["plugins"]}
    assert statuses["fxgood"] == "loaded" and statuses["fxhookraises"] == statuses["fxrelu"] == "error"
    assert len(listing["errors"]) == 2 and any("the layer table is corrupt" in e for e in listing["errors"])


def test_disabled_plugins_are_listed_as_disabled(install, capsys, monkeypatch):
    install("good", "broken_import")
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "fxbrokenimport")
    code, out = _run(capsys)
    assert code == 0
    assert re.search(r"^fxbrokenimport +dpnetfx-broken-import +1\.0 +disabled +\(DPNET_DISABLE_PLUGINS lists it\)$",
                     out, re.M)
    assert "dpnetfx_broken_import" not in sys.modules

    monkeypatch.setenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", "1")
    code, out = _run(capsys, "--json")
    listing = json.loads(out)
    assert code == 0 and listing["autoload"] is False
    for plugin in listing["plugins"][1:]:
        assert (plugin["status"], plugin["reason"]) == ("disabled", "DPNET_DISABLE_PLUGIN_AUTOLOAD is set")
    assert {p["name"] for p in listing["plugins"]} >= {"dpnet", "fxgood", "fxbrokenimport"}


def test_python_dash_m(install, site):
    """The module runs as `python -m dpnet.plugins` and finds entry points on PYTHONPATH like installed ones."""
    install("good")
    proc = run_in_group([sys.executable, "-m", "dpnet.plugins", "--json"], 60, cwd=site.parent,
                        env=_clean_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    by_name = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert by_name["fxgood"]["layers"]["activation"] == ["fx_softsign"]
    help_text = run_in_group([sys.executable, "-m", "dpnet.plugins", "--help"], 60).stdout
    assert "usage: python -m dpnet.plugins [-h] [--json]" in help_text


# ---------------------------------------------------------------------------------------------------- the guide
def test_guide_prints_every_file_of_the_example_exactly():
    """docs/plugins.md and docs/examples/dpnet-swish cannot drift: a newcomer copying the guide gets the example."""
    printed, example = printed_files("file"), example_files(EXAMPLE)
    assert sorted(printed) == sorted(example)
    for path, text in example.items():
        assert printed[path] == text, f"docs/plugins.md prints a different {path} than docs/examples/{path}"


def test_guide_states_the_contract():
    text = GUIDE.read_text()
    for needle in ("from dpnet import hookimpl", "dpnet_layers()", "dpnet_update_rules()",
                   "Layer(name, kind, forward, backward)", "`forward(x) -> (out, cache)`",
                   "`backward(dout, cache) -> (dx, dgamma, dbeta)`", "`forward(scores, y) -> (loss, dscores)`",
                   "rule(w, dw, config=None) -> (next_w, config)", "[options.entry_points]\ndpnet =\n    myname = ",
                   "DPNET_DISABLE_PLUGINS=", "DPNET_DISABLE_PLUGIN_AUTOLOAD=1", "python -m dpnet.plugins --json",
                   "check_layer(", "check_update_rule(", "python -m dpnet.train --activation swish --update-rule lion",
                   'activation="swish"', 'update_rule="lion"'):
        assert needle in text, needle


def _venv_with_example(tmp_path):
    """A fresh virtualenv that sees this environment's packages (dpnet, numpy, pluggy, pytest) and into which the
    guide's example is installed with pip, as a user would (a wheel build; no network: --no-deps,
    --no-build-isolation)."""
    venv = tmp_path / "venv"
    assert run_in_group([sys.executable, "-m", "venv", "--without-pip", str(venv)], 120).returncode == 0
    python = venv / "bin" / "python"
    purelib = run_in_group([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           60).stdout.strip()
    # This environment's site-packages as a site dir (its .pth files, an editable dpnet's among them, are processed).
    parent = sysconfig.get_paths()["purelib"]
    Path(purelib, "_dpnet_test_parent_env.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    source = tmp_path / "dpnet-swish"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    proc = run_in_group([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                         "--no-build-isolation", "--no-input", "--disable-pip-version-check", "--quiet", str(source)],
                        300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python, source


@pytest.mark.timeout(600)
def test_guide_example_installed_with_pip_is_listed_checked_and_trains(tmp_path, cifar10_dir, dpnet_cache_dir):
    """The acceptance test of the plugin system: the guide's plugin, pip-installed into a fresh environment, is
    listed, passes dpnet.testing, and trains a FullyConnectedNet with its activation and update rule, from Python
    and from `python -m dpnet.train`."""
    python, source = _venv_with_example(tmp_path)
    env = _clean_env(DPNET_CACHE_DIR=str(dpnet_cache_dir))
    run = dict(cwd=tmp_path, env=env)

    proc = run_in_group([str(python), "-m", "dpnet.plugins", "--json"], 300, **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by_name = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert by_name["swish"]["distribution"] == "dpnet-swish" and by_name["swish"]["version"] == "0.1.0"
    assert by_name["swish"]["layers"]["activation"] == ["swish"] and by_name["swish"]["update_rules"] == ["lion"]
    # installed, not found in the source tree
    where = run_in_group([str(python), "-c", "import dpnet_swish; print(dpnet_swish.__file__)"], 300, **run)
    assert where.returncode == 0 and "site-packages" in where.stdout, where.stdout + where.stderr

    # the example's own tests: check_plugin (check_layer + check_update_rule) and a training run
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\n")
    proc = run_in_group([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ini),
                         "--rootdir", str(tmp_path), str(source / "tests")], 300, **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout

    # ... and from the command line, on a slice of the real CIFAR-10
    usage = run_in_group([str(python), "-m", "dpnet.train", "--help"], 300, **run)
    assert usage.returncode == 0 and "--activation" in usage.stdout and "--update-rule" in usage.stdout, usage.stdout
    proc = run_in_group([str(python), "-m", "dpnet.train", "--activation", "swish", "--update-rule", "lion",
                         "--data-dir", str(cifar10_dir), "--num-train", "500", "--hidden-dims", "20",
                         "--batch-size", "100", "--epochs", "1", "--logdir", str(tmp_path / "run"), "--quiet",
                         "--zca", "0"],
                        300, **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^test accuracy \d\.\d+ ", proc.stdout, re.M), proc.stdout
