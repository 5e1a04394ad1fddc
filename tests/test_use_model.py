"""Using a trained model: dpnet.load_model, `python -m dpnet.evaluate`, `dpnet.predict` and `dpnet.export`.

One small run of `python -m dpnet.train` (a FullyConnectedNet with batchnorm and dropout, float32), the same run with
`--test-flips`, with `--zca` (whitened images) and with both, and one Solver run in this process (a Sequential with
layernorm, batchnorm and dropout) on a slice of the real CIFAR-10 give the checkpoints; commands run as subprocesses
where their exit code and output are tested, else in this process.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import run_in_group

import dpnet
from dpnet import registry
from dpnet.checkpoint import CheckpointError, load_checkpoint
from dpnet.flip_average import FlipAveraged, unwrap
from dpnet.loading import CIFAR10_CLASSES, ModelLoadError, load_model, preprocess

DATA_FLAGS = ["--num-train", "1000", "--batch-size", "100", "--epochs", "3", "--seed", "3", "--lr", "2e-3",
              "--update-rule", "adam", "--lr-schedule", "exponential", "--warmup-epochs", "0", "--weight-decay", "0",
              "--label-smoothing", "0", "--no-augment", "--zca", "0", "--ema", "0", "--no-test-flips"]
SEQ_SPEC = [{"layer": "affine", "units": 48}, "layernorm", "relu", {"layer": "dropout", "keep": 0.9},
            {"layer": "affine", "units": 32}, "batchnorm", "relu", {"layer": "affine", "units": 10}]


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cli(clean_env, dpnet_cache_dir):
    """cli(module, *args, cwd, timeout=120, mpiexec=None, n=None, **env): run `python -m dpnet.<module> args` in a
    process group of its own (tests/support/processes.py); one still going after `timeout` seconds fails the test."""
    def run(module, *args, cwd, timeout=120, mpiexec=None, n=None, **env):
        command = [sys.executable, "-m", f"dpnet.{module}", *map(str, args)]
        if n is not None:
            command = [mpiexec, "-n", str(n), *command]
        env = clean_env(DPNET_CACHE_DIR=str(dpnet_cache_dir), DPNET_BLAS_THREADS="1", **env)
        env.pop("DPNET_DATA_DIR", None)
        return run_in_group(command, timeout, cwd=cwd, env=env)

    return run


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_error(result, prog, *fragments):
    """The run failed with exit code 2 and exactly one line on stderr, `prog: error: ...`, holding the fragments."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def in_process(main, argv, capsys):
    """(exit code, stdout, stderr) of a command's main(argv) run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse, and evaluate's collective checks
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def accuracy_line(stdout, split="test"):
    found = re.findall(rf"^{split} accuracy (\d\.\d{{4}}) ", stdout, flags=re.M)
    assert len(found) == 1, stdout
    return found[0]


@pytest.fixture(scope="module")
def test_images(cifar10_dir, dpnet_cache_dir):
    """The raw CIFAR-10 test images, uint8 (10000, 3, 32, 32), and labels."""
    from dpnet.data_utils import load_CIFAR10_raw

    _, _, X, y = load_CIFAR10_raw(cifar10_dir, cache=dpnet_cache_dir)
    return X, y


def _train_run(cli, cifar10_dir, work, *flags):
    """A run of `python -m dpnet.train`: 3072-40-30-10, batchnorm, dropout 0.9, float32, with `flags`; its folder,
    the test accuracies it printed (best, final), its best validation accuracy, as printed (4 digits), and its
    output."""
    result = ok(cli("train", *DATA_FLAGS, "--hidden-dims", "40", "30", "--dropout", "0.9", *flags, "--data-dir",
                    cifar10_dir, "--logdir", work / "run", "--quiet", cwd=work, timeout=180))
    found = re.search(r"^test accuracy (\d\.\d{4}) \(best validation accuracy (\d\.\d{4}); final parameters "
                      r"(\d\.\d{4});", result.stdout, flags=re.M)
    assert found, result.stdout
    return dict(dir=work / "run", test=found[1], val=found[2], final=found[3], stdout=result.stdout)


@pytest.fixture(scope="module")
def fc_run(cli, cifar10_dir, tmp_path_factory):
    """A run of `python -m dpnet.train` (_train_run)."""
    return _train_run(cli, cifar10_dir, tmp_path_factory.mktemp("fc_run"))


@pytest.fixture(scope="module")
def flip_run(cli, cifar10_dir, tmp_path_factory):
    """fc_run's run with --test-flips: validation and test images scored averaged with their mirrors."""
    return _train_run(cli, cifar10_dir, tmp_path_factory.mktemp("flip_run"), "--test-flips")


def _solver_run(model, data, path):
    from dpnet.solver import Solver

    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3}, num_epochs=2,
                    batch_size=100, num_train_samples=100, checkpoint_name=str(path), verbose=False, seed=0)
    solver.train()
    return solver


@pytest.fixture(scope="module")
def small_data(cifar10_dir, dpnet_cache_dir):
    from dpnet.data_utils import get_CIFAR10_data

    return get_CIFAR10_data(num_training=500, num_validation=100, num_test=200, data_dir=cifar10_dir,
                            dtype=np.float32, lazy=True, download=False, cache=dpnet_cache_dir)


@pytest.fixture(scope="module")
def seq_solver(small_data, tmp_path_factory):
    """A Sequential (layernorm, batchnorm, dropout) trained by a Solver in this process, checkpointed by it (no
    command-line configuration): (solver, its last checkpoint)."""
    from dpnet.models import Sequential

    work = tmp_path_factory.mktemp("seq")
    solver = _solver_run(Sequential(SEQ_SPEC, seed=1), small_data, work / "seq")
    return solver, work / "seq_epoch_2.npz"


# ----------------------------------------------------------------------------------------------- load_model
@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["best", "final"])
def test_load_model_gives_the_solvers_scores_bit_for_bit(seq_solver, small_data, which):
    solver, path = seq_solver
    X = np.asarray(small_data["X_test"])
    solver.use_params(which)
    expected = solver.model.loss(X)
    model = dpnet.load_model(path, which=which)
    assert type(model).__name__ == "Sequential" and model.spec == solver.model.spec
    assert np.array_equal(model.loss(X), expected)
    assert all(state["mode"] == "test" for state in model.bn_params)
    np.testing.assert_array_equal(model.mean_image, small_data["X_train"].mean_image)  # saved, not recomputed
    assert model.class_names == CIFAR10_CLASSES
    solver.use_params("best")


@pytest.mark.timeout(120)
def test_load_model_rebuilds_a_fully_connected_net(small_data, tmp_path):
    from dpnet.classifiers.fc_net import FullyConnectedNet

    net = FullyConnectedNet([30, 20], normalization="layernorm", dropout=0.8, seed=2)
    solver = _solver_run(net, small_data, tmp_path / "fc")
    X = np.asarray(small_data["X_test"])
    model = load_model(tmp_path / "fc_epoch_2.npz")
    assert isinstance(model, FullyConnectedNet) and model.normalization == "layernorm"
    assert model.use_dropout and model.dropout_param["p"] == 0.8 and model.dropout_param["mode"] == "test"
    assert np.array_equal(model.loss(X), solver.model.loss(X))
    assert np.array_equal(model.loss(X), model.loss(X))  # test mode: no dropout mask


@pytest.mark.timeout(240)
def test_checkpoints_without_architecture_or_mean_load_from_their_configuration(fc_run, cli, cifar10_dir, tmp_path):
    """A checkpoint written before dpnet recorded the architecture and the mean image still loads (from the saved
    configuration), and evaluate recomputes its mean image as the run did."""
    arrays, meta = load_checkpoint(fc_run["dir"] / "best.npz")
    assert meta["architecture"]["type"] == "FullyConnectedNet" and meta["providers"] == []
    assert arrays["mean_image"].shape == (3, 32, 32) and arrays["mean_image"].dtype == np.float64
    old = tmp_path / "old.npz"
    for key in ("architecture", "providers"):
        del meta[key]
    del arrays["mean_image"]
    np.savez(old, meta=np.array(json.dumps(meta)), **arrays)
    X = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    loaded, again = load_model(fc_run["dir"] / "best.npz"), load_model(old)
    assert again.mean_image is None and np.array_equal(again.loss(X), loaded.loss(X))
    result = ok(cli("evaluate", old, "--data-dir", cifar10_dir, "--no-plot", cwd=tmp_path))
    assert accuracy_line(result.stdout) == fc_run["test"]
    assert "recomputed from its 1000 training images" in result.stderr


def test_load_model_arguments(seq_solver):
    with pytest.raises(ValueError, match="which must be 'best' or 'final'"):
        load_model(seq_solver[1], which="last")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("no-such-checkpoint.npz")


# ----------------------------------------------------------------------------------------------- evaluate
@pytest.mark.timeout(240)
def test_evaluate_prints_the_accuracy_the_training_run_printed(fc_run, cli, cifar10_dir, tmp_path):
    best = ok(cli("evaluate", fc_run["dir"] / "best.npz", "--data-dir", cifar10_dir, "--json", tmp_path / "e.json",
                  cwd=tmp_path))
    assert accuracy_line(best.stdout) == fc_run["test"]
    summary = json.loads((tmp_path / "e.json").read_text())
    counts = np.array(summary["confusion"])
    assert counts.shape == (10, 10) and counts.sum() == summary["images"] == 10000
    assert np.trace(counts) == summary["correct"] and f"{summary['accuracy']:.4f}" == fc_run["test"]
    assert [row["images"] for row in summary["per_class"]] == [1000] * 10  # CIFAR-10's test set is balanced
    assert [row["correct"] for row in summary["per_class"]] == list(np.diag(counts))
    pairs = summary["most_confused"]
    assert pairs and pairs == sorted(pairs, key=lambda p: -p["images"])
    top = max(((t, p) for t in range(10) for p in range(10) if t != p), key=lambda tp: counts[tp])
    assert pairs[0]["images"] == counts[top]
    assert "confusion matrix (rows: true class, columns: predicted class)" in best.stdout
    assert (fc_run["dir"] / "best-confusion-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    final = ok(cli("evaluate", fc_run["dir"] / "last.npz", "--which", "final", "--data-dir", cifar10_dir,
                   "--no-plot", cwd=tmp_path))
    assert accuracy_line(final.stdout) == fc_run["final"]
    val = ok(cli("evaluate", fc_run["dir"] / "last.npz", "--split", "val", "--data-dir", cifar10_dir, "--no-plot",
                 cwd=tmp_path))
    assert accuracy_line(val.stdout, "val") == fc_run["val"]


@pytest.mark.timeout(120)
def test_evaluate_scores_a_solvers_checkpoint_as_the_solver_does(seq_solver, test_images, cifar10_dir, capsys):
    from dpnet import evaluate
    from dpnet.data_utils import ImageArray

    solver, path = seq_solver
    X, y = test_images
    code, out, err = in_process(evaluate.main, [path, "--data-dir", cifar10_dir, "--no-plot"], capsys)
    assert code == 0 and err == "", err
    expected = solver.check_accuracy(ImageArray(X, solver.X_train.mean_image, np.float32), y)
    assert accuracy_line(out) == f"{expected:.4f}"
    code, out, err = in_process(evaluate.main, [path, "--split", "val", "--data-dir", cifar10_dir], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not record its validation images" in err, err


@pytest.mark.timeout(240)
def test_evaluate_under_mpiexec_scores_shards_and_prints_once(fc_run, cli, mpiexec, cifar10_dir, tmp_path):
    result = ok(cli("evaluate", fc_run["dir"] / "best.npz", "--data-dir", cifar10_dir, "--no-plot", cwd=tmp_path,
                    mpiexec=mpiexec, n=2, timeout=180))
    assert accuracy_line(result.stdout) == fc_run["test"]
    assert result.stdout.count("confusion matrix") == 1 and "on 2 processes" in result.stdout
    bad = cli("evaluate", tmp_path / "missing.npz", cwd=tmp_path, mpiexec=mpiexec, n=2, timeout=120)
    one_error(bad, "dpnet-evaluate", "does not exist")


# ----------------------------------------------------------------------------------------------- predict
def softmax(model, images):
    """float64 (N, C): the softmax of the model's scores for pixel images (N, 3, 32, 32), as one batch."""
    scores = model.loss(preprocess(model, images)).astype(np.float64)
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def recognized(fc_run, test_images):
    """(model, index of the first test image the model classifies correctly, its probabilities (scored alone))."""
    model = load_model(fc_run["dir"] / "best.npz")
    X, y = test_images
    index = int(np.flatnonzero(np.argmax(softmax(model, X[:200]), axis=1) == y[:200])[0])
    return model, index, softmax(model, X[index:index + 1])[0]


def _predicted(path):
    """{input name: prediction} of predict's JSON file."""
    return {p["input"]: p for p in json.loads(Path(path).read_text())["predictions"]}


def _probabilities(prediction):
    return list(prediction["probabilities"].values())


@pytest.mark.timeout(120)
def test_predict_gives_a_png_its_class_with_the_models_probability(fc_run, recognized, test_images, cli, tmp_path,
                                                                  capsys):
    from PIL import Image

    from dpnet import predict

    model, index, probs = recognized
    X, y = test_images
    label, picture = CIFAR10_CLASSES[y[index]], X[index].transpose(1, 2, 0)
    Image.fromarray(picture).save(tmp_path / "image.png")
    Image.fromarray(picture).resize((96, 96), Image.Resampling.NEAREST).save(tmp_path / "large.png")  # 3x each pixel
    Image.fromarray(picture).save(tmp_path / "image.jpg", quality=95)
    result = ok(cli("predict", fc_run["dir"] / "best.npz", "image.png", "--top", "2", "--json", "p.json",
                    cwd=tmp_path))
    second = max((k for k in range(10) if k != y[index]), key=lambda k: probs[k])
    assert result.stdout == f"image.png: {label} {probs[y[index]]:.4f}, {CIFAR10_CLASSES[second]} {probs[second]:.4f}\n"
    predicted = _predicted(tmp_path / "p.json")["image.png"]
    assert predicted["top"][0] == dict(name=label, index=int(y[index]), probability=probs[y[index]])
    assert _probabilities(predicted) == list(probs)
    # the 96x96 picture is averaged back to the very same 32x32 pixels
    assert in_process(predict.main, [fc_run["dir"] / "best.npz", tmp_path / "large.png", "--json",
                                     tmp_path / "large.json"], capsys)[0] == 0
    assert _probabilities(_predicted(tmp_path / "large.json")[str(tmp_path / "large.png")]) == list(probs)
    assert in_process(predict.main, [fc_run["dir"] / "best.npz", tmp_path / "image.jpg", "--json",
                                     tmp_path / "jpeg.json"], capsys)[0] == 0
    jpeg = np.array(_probabilities(_predicted(tmp_path / "jpeg.json")[str(tmp_path / "image.jpg")]))
    assert abs(jpeg.sum() - 1) < 1e-12 and np.abs(jpeg - probs).max() < 0.05  # JPEG is lossy, but close


@pytest.mark.timeout(120)
def test_predict_reads_npy_arrays_of_pixels_or_preprocessed_images(fc_run, recognized, test_images, tmp_path,
                                                                   capsys):
    from dpnet import predict

    model, index, probs = recognized
    X, _ = test_images
    images = X[index:index + 3]
    expected = softmax(model, images)  # the three scored together, as predict scores one file's
    files = {"chw.npy": images, "hwc.npy": images.transpose(0, 2, 3, 1).astype(np.float64),
             "one.npy": images[0].transpose(1, 2, 0), "pre.npy": preprocess(model, images)}
    for name, array in files.items():
        np.save(tmp_path / name, array)
        flags = ["--preprocessed"] if name == "pre.npy" else []
        argv = [fc_run["dir"] / "best.npz", tmp_path / name, *flags, "--json", tmp_path / f"{name}.json"]
        code, out, err = in_process(predict.main, argv, capsys)
        assert code == 0 and err == "", err
        predicted = _predicted(tmp_path / f"{name}.json")
        if name == "one.npy":
            assert list(predicted) == [str(tmp_path / name)] and out.startswith(f"{tmp_path / name}: ")
            assert _probabilities(predicted[str(tmp_path / name)]) == list(probs)
            continue
        assert list(predicted) == [f"{tmp_path / name}[{i}]" for i in range(3)]
        assert [_probabilities(p) for p in predicted.values()] == expected.tolist()
        assert len(out.splitlines()) == 3 and len(next(iter(predicted.values()))["top"]) == 3


# ----------------------------------------------------------------------------------------------- export
def _onnx_scores(path, X):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"images": X})[0]


@pytest.mark.timeout(120)
def test_onnx_export_gives_dpnets_scores_on_cifar10(fc_run, seq_solver, flip_run, test_images, tmp_path, capsys):
    import onnx

    from dpnet import export

    X, _ = test_images
    checkpoints = (("fc", fc_run["dir"] / "best.npz"), ("seq", seq_solver[1]), ("flip", flip_run["dir"] / "best.npz"))
    for name, path in checkpoints:
        code, out, err = in_process(export.main, [path, tmp_path / f"{name}.onnx"], capsys)
        assert code == 0 and "checked with onnxruntime" in out, out + err
        model = load_model(path)
        images = preprocess(model, X[:1000])
        assert images.dtype == np.float32 and images.shape == (1000, 3, 32, 32)
        ours, theirs = model.loss(images), _onnx_scores(tmp_path / f"{name}.onnx", images)
        assert theirs.dtype == np.float32 and theirs.shape == ours.shape == (1000, 10)
        assert np.max(np.abs(theirs - ours)) <= 1e-5 * max(1.0, np.max(np.abs(ours))), name
        graph = onnx.load(tmp_path / f"{name}.onnx")
        ops = {node.op_type for node in graph.graph.node}
        assert {"Gemm", "Relu", "Sub", "Div"} <= ops and "Dropout" not in ops, ops
        assert ("LayerNormalization" in ops) == (name == "seq")
        assert ({"Slice", "Concat", "Split"} <= ops) == (name == "flip") == isinstance(model, FlipAveraged)
        props = {p.key: p.value for p in graph.metadata_props}
        assert json.loads(props["dpnet.classes"]) == list(CIFAR10_CLASSES)
        assert json.loads(props["dpnet.test_flips"]) is (name == "flip")


# ----------------------------------------------------------------------------------------------- test-time flips
@pytest.mark.timeout(240)
def test_a_run_with_test_flips_trains_the_same_parameters_and_scores_images_with_their_mirrors(fc_run, flip_run):
    (plain, plain_meta), (flipped, meta) = (load_checkpoint(run["dir"] / "last.npz") for run in (fc_run, flip_run))
    assert meta["loss_history"] == plain_meta["loss_history"]
    params = [key for key in plain if key.startswith(("param/", "norm/", "optim/"))]
    assert params and all(np.array_equal(flipped[key], plain[key]) for key in params)  # bit for bit
    assert meta["test_flips"] is meta["config"]["test_flips"] is True and plain_meta["test_flips"] is False
    assert meta["model"] == "FullyConnectedNet" and meta["architecture"] == plain_meta["architecture"]
    assert meta["val_acc_history"] != plain_meta["val_acc_history"]  # scored with the mirrors
    assert "; images averaged with their mirrors; 3 epochs" in flip_run["stdout"]
    assert "mirrors" not in fc_run["stdout"]
    model = load_model(flip_run["dir"] / "best.npz")
    assert isinstance(model, FlipAveraged) and model.mean_image.shape == (3, 32, 32) and model.class_names
    assert type(load_model(flip_run["dir"] / "best.npz", test_flips=False)).__name__ == "FullyConnectedNet"


@pytest.mark.timeout(240)
def test_evaluate_prints_the_accuracy_a_run_with_test_flips_printed(fc_run, flip_run, cli, cifar10_dir, tmp_path,
                                                                    capsys):
    from dpnet import evaluate

    best = ok(cli("evaluate", flip_run["dir"] / "best.npz", "--data-dir", cifar10_dir, "--no-plot", cwd=tmp_path))
    assert accuracy_line(best.stdout) == flip_run["test"]
    assert "(batchnorm, relu, float32), images averaged with their mirrors" in best.stdout
    cases = [  # (checkpoint, flags, the accuracy printed by a run)
        (flip_run, ["--which", "final"], flip_run["final"]),
        (flip_run, ["--split", "val"], flip_run["val"]),
        (flip_run, ["--which", "final", "--no-test-flips"], fc_run["final"]),  # the same final parameters
        (fc_run, ["--which", "final", "--test-flips"], flip_run["final"]),
    ]
    for run, flags, expected in cases:
        code, out, err = in_process(evaluate.main, [run["dir"] / "last.npz", *flags, "--data-dir", cifar10_dir,
                                                    "--no-plot"], capsys)
        assert code == 0 and err == "", err
        assert accuracy_line(out, "val" if "val" in flags else "test") == expected, (run["dir"], flags)


@pytest.mark.timeout(120)
def test_predict_gives_the_probabilities_of_the_averaged_scores(flip_run, test_images, tmp_path, capsys):
    from dpnet import predict

    X, _ = test_images
    np.save(tmp_path / "images.npy", X[:3])
    model = load_model(flip_run["dir"] / "best.npz")
    inner, images = unwrap(model), preprocess(model, X[:3])
    assert np.array_equal(model.loss(images), (inner.loss(images) + inner.loss(images[..., ::-1])) * 0.5)
    for flags, scorer in (([], model), (["--no-test-flips"], inner)):
        argv = [flip_run["dir"] / "best.npz", tmp_path / "images.npy", *flags, "--json", tmp_path / "p.json"]
        code, _, err = in_process(predict.main, argv, capsys)
        assert code == 0 and err == "", err
        predicted = _predicted(tmp_path / "p.json")
        assert [_probabilities(p) for p in predicted.values()] == softmax(scorer, X[:3]).tolist(), flags


@pytest.mark.timeout(120)
def test_test_flips_on_a_model_of_vectors_exit_2_with_one_message(tmp_path, capsys):
    from dpnet import evaluate, export, predict
    from dpnet.models import Sequential
    from dpnet.solver import Solver

    rng = np.random.default_rng(0)
    flat = dict(X_train=rng.standard_normal((40, 3072)), y_train=rng.integers(0, 10, 40),
                X_val=rng.standard_normal((10, 3072)), y_val=rng.integers(0, 10, 10))
    Solver(Sequential([{"layer": "affine", "units": 10}], input_dim=3072), flat, num_epochs=1, batch_size=20,
           checkpoint_name=str(tmp_path / "flat"), verbose=False, seed=0).train()
    path = tmp_path / "flat_epoch_1.npz"
    assert load_checkpoint(path)[1]["test_flips"] is False
    with pytest.raises(ModelLoadError, match=r"cannot be scored with test-time flips: test-time flips need a model of "
                                             r"images \(C, H, W\); this Sequential takes inputs of shape \(3072,\)"):
        load_model(path, test_flips=True)
    np.save(tmp_path / "zeros.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    for module, extra in ((evaluate, []), (predict, [tmp_path / "zeros.npy"]), (export, [tmp_path / "m.onnx"])):
        code, out, err = in_process(module.main, [path, *extra, "--test-flips"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, (module, out, err)
        assert err.startswith(f"{module.PROG}: error: checkpoint {path} cannot be scored with test-time flips: "), err


# ----------------------------------------------------------------------------------------------- ZCA whitening
@pytest.fixture(scope="module")
def zca_run(cli, cifar10_dir, tmp_path_factory):
    """fc_run's run with --zca 0.01: every image whitened by the ZCA matrix of its 1000 training images."""
    return _train_run(cli, cifar10_dir, tmp_path_factory.mktemp("zca_run"), "--zca", "0.01")


@pytest.fixture(scope="module")
def zca_flip_run(cli, cifar10_dir, tmp_path_factory):
    """zca_run's run with --test-flips: whitened images scored averaged with their mirrors."""
    return _train_run(cli, cifar10_dir, tmp_path_factory.mktemp("zca_flip_run"), "--zca", "0.01", "--test-flips")


def _evaluated_images(path, cifar10_dir):
    """(model, the test images as dpnet.evaluate makes them: whitened, float32 (10000, 3, 32, 32))."""
    from types import SimpleNamespace

    from dpnet import evaluate
    from dpnet.loading import read_model

    model, meta = read_model(path)
    X, _, _ = evaluate.split_images(model, meta, SimpleNamespace(split="test", data_dir=str(cifar10_dir),
                                                                  checkpoint=str(path)))
    return model, X


@pytest.mark.timeout(240)
def test_evaluate_prints_the_accuracy_a_zca_run_printed(zca_run, cli, cifar10_dir, dpnet_cache_dir, tmp_path, capsys,
                                                        monkeypatch):
    from dpnet import evaluate

    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    arrays, meta = load_checkpoint(zca_run["dir"] / "last.npz")
    assert arrays["zca"].dtype == np.float32 and arrays["zca"].shape == (3072, 3072) and meta["config"]["zca"] == 0.01
    best = ok(cli("evaluate", zca_run["dir"] / "best.npz", "--data-dir", cifar10_dir, "--no-plot", cwd=tmp_path))
    assert accuracy_line(best.stdout) == zca_run["test"]
    assert "(batchnorm, relu, float32), inputs ZCA-whitened" in best.stdout
    for flags, expected in ((["--which", "final"], zca_run["final"]), (["--split", "val"], zca_run["val"])):
        code, out, err = in_process(evaluate.main, [zca_run["dir"] / "last.npz", *flags, "--data-dir", cifar10_dir,
                                                    "--no-plot"], capsys)
        assert code == 0 and err == "", err
        assert accuracy_line(out, "val" if "val" in flags else "test") == expected, flags


@pytest.mark.timeout(240)
def test_evaluate_prints_the_accuracy_a_zca_run_with_test_flips_printed(zca_run, zca_flip_run, cifar10_dir,
                                                                        dpnet_cache_dir, capsys, monkeypatch):
    from dpnet import evaluate

    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    (arrays, meta), (flip_arrays, flip_meta) = (load_checkpoint(run["dir"] / "last.npz")
                                                for run in (zca_run, zca_flip_run))
    assert np.array_equal(flip_arrays["zca"], arrays["zca"]) and flip_meta["loss_history"] == meta["loss_history"]
    cases = [  # (checkpoint, flags, the accuracy printed by a run)
        ("best.npz", [], zca_flip_run["test"]),
        ("last.npz", ["--split", "val"], zca_flip_run["val"]),
        ("last.npz", ["--which", "final", "--no-test-flips"], zca_run["final"]),  # the same final parameters
    ]
    for name, flags, expected in cases:
        code, out, err = in_process(evaluate.main, [zca_flip_run["dir"] / name, *flags, "--data-dir", cifar10_dir,
                                                    "--no-plot"], capsys)
        assert code == 0 and err == "", err
        assert accuracy_line(out, "val" if "val" in flags else "test") == expected, (name, flags)
        assert ("images averaged with their mirrors, inputs ZCA-whitened" in out) == ("--no-test-flips" not in flags)


@pytest.mark.timeout(240)
def test_evaluate_under_mpiexec_whitens_a_zca_runs_images_alike(zca_flip_run, cli, mpiexec, cifar10_dir, tmp_path):
    result = ok(cli("evaluate", zca_flip_run["dir"] / "best.npz", "--data-dir", cifar10_dir, "--no-plot",
                    cwd=tmp_path, mpiexec=mpiexec, n=2, timeout=180))
    assert accuracy_line(result.stdout) == zca_flip_run["test"] and "on 2 processes" in result.stdout


@pytest.mark.timeout(120)
def test_predict_whitens_an_image_of_a_zca_run_as_training_and_evaluate_do(zca_run, zca_flip_run, test_images,
                                                                            cifar10_dir, dpnet_cache_dir, tmp_path,
                                                                            capsys, monkeypatch):
    from PIL import Image

    from dpnet import predict

    monkeypatch.setenv("DPNET_CACHE_DIR", str(dpnet_cache_dir))
    X, y = test_images
    model, evaluated = _evaluated_images(zca_run["dir"] / "best.npz", cifar10_dir)
    scores = np.concatenate([model.loss(evaluated[i:i + 100]) for i in (0, 100)]).astype(np.float64)  # as evaluate
    in_batches = np.exp(scores - scores.max(axis=1, keepdims=True))
    in_batches /= in_batches.sum(axis=1, keepdims=True)
    index = int(np.flatnonzero(np.argmax(scores, axis=1) == y[:200])[0])
    assert np.array_equal(preprocess(model, X[index:index + 1])[0], evaluated[index])  # the very bits
    assert np.array_equal(preprocess(model, X[:200]), evaluated[:200])
    probs = softmax(model, X[index:index + 1])[0]
    np.testing.assert_allclose(probs, in_batches[index], rtol=0, atol=1e-6)  # (one row through the network)

    Image.fromarray(X[index].transpose(1, 2, 0)).save(tmp_path / "image.png")
    np.save(tmp_path / "images.npy", X[index:index + 3])
    np.save(tmp_path / "pre.npy", preprocess(model, X[index:index + 3]))
    for name, flags, expected in (("image.png", [], [probs]), ("images.npy", [], softmax(model, X[index:index + 3])),
                                  ("pre.npy", ["--preprocessed"], softmax(model, X[index:index + 3]))):
        argv = [zca_run["dir"] / "best.npz", tmp_path / name, *flags, "--json", tmp_path / "p.json"]
        code, out, err = in_process(predict.main, argv, capsys)
        assert code == 0 and err == "", err
        assert [_probabilities(p) for p in _predicted(tmp_path / "p.json").values()] == np.asarray(expected).tolist()
    assert out.startswith(f"{tmp_path / 'pre.npy'}[0]: {CIFAR10_CLASSES[y[index]]} ")

    flipped = load_model(zca_flip_run["dir"] / "best.npz")
    inner, images = unwrap(flipped), preprocess(flipped, X[:3])
    assert np.array_equal(flipped.loss(images), (inner.loss(images) + inner.loss(images[..., ::-1])) * 0.5)
    code, _, err = in_process(predict.main, [zca_flip_run["dir"] / "best.npz", tmp_path / "images.npy", "--json",
                                             tmp_path / "f.json"], capsys)
    assert code == 0 and err == "", err
    expected = softmax(flipped, X[index:index + 3]).tolist()  # the mirrors of the whitened images
    assert [_probabilities(p) for p in _predicted(tmp_path / "f.json").values()] == expected


@pytest.mark.timeout(120)
def test_onnx_export_of_a_zca_run_whitens_before_the_mirror_branch(zca_run, zca_flip_run, test_images, tmp_path,
                                                                   capsys):
    import onnx

    from dpnet import export
    from dpnet.data.whitening import whiten

    X, _ = test_images
    for name, run in (("zca", zca_run), ("zca-flip", zca_flip_run)):
        path = tmp_path / f"{name}.onnx"
        code, out, err = in_process(export.main, [run["dir"] / "best.npz", path], capsys)
        assert code == 0 and "checked with onnxruntime" in out and "inputs ZCA-whitened" in out, out + err
        model = load_model(run["dir"] / "best.npz")
        centered = np.subtract(X[:1000], model.mean_image, dtype=np.float64).astype(np.float32)  # the graph's input
        ours, theirs = model.loss(preprocess(model, X[:1000])), _onnx_scores(path, centered)
        assert theirs.shape == ours.shape == (1000, 10)
        assert np.max(np.abs(theirs - ours)) <= 1e-5 * max(1.0, np.max(np.abs(ours))), name
        graph = onnx.load(path)
        nodes = [node.op_type for node in graph.graph.node]
        assert nodes[:3] == ["Reshape", "MatMul", "Reshape"], nodes  # the whitening first ...
        assert ("Slice" in nodes) == (name == "zca-flip") == isinstance(model, FlipAveraged)
        if "Slice" in nodes:  # ... then the mirrors of the whitened images
            slice_node = graph.graph.node[nodes.index("Slice")]
            assert slice_node.input[0] == graph.graph.node[2].output[0]
            inner, white = unwrap(model), whiten(centered, model.zca, np.float32)
            wrong = (inner.loss(white) + inner.loss(whiten(centered[..., ::-1], model.zca, np.float32))) * 0.5
            assert np.max(np.abs(wrong - theirs)) > 1e-3 * np.max(np.abs(ours))  # (whitening the mirrors differs)
        props = {p.key: p.value for p in graph.metadata_props}
        assert json.loads(props["dpnet.zca"]) is True and json.loads(props["dpnet.test_flips"]) is (name != "zca")
        assert "whitened by the training's ZCA matrix" in graph.doc_string


# ----------------------------------------------------------------------------------------------- plugins
def _plugin_checkpoint(install, site, tmp_path):
    """A checkpoint of a Sequential using the activation fx_softsign of the fixture plugin dpnetfx-good."""
    from dpnet.models import Sequential
    from dpnet.solver import Solver

    install("good")
    rng = np.random.default_rng(0)
    data = dict(X_train=rng.standard_normal((40, 3, 32, 32)), y_train=rng.integers(0, 10, 40),
                X_val=rng.standard_normal((10, 3, 32, 32)), y_val=rng.integers(0, 10, 10))
    model = Sequential([{"layer": "affine", "units": 8}, "fx_softsign", {"layer": "affine", "units": 10}], seed=0)
    Solver(model, data, num_epochs=1, batch_size=20, checkpoint_name=str(tmp_path / "fx"), verbose=False,
           seed=0).train()
    return tmp_path / "fx_epoch_1.npz"


def test_a_checkpoint_whose_plugin_is_missing_names_the_layer_and_the_plugin(install, site, tmp_path, capsys, cli,
                                                                             monkeypatch):
    from dpnet import evaluate, export, predict

    path = _plugin_checkpoint(install, site, tmp_path)
    _, meta = load_checkpoint(path)
    assert meta["providers"] == [dict(kind="activation", name="fx_softsign", plugin="fxgood",
                                      distribution="dpnetfx-good", version="1.0")]
    assert type(load_model(path)).__name__ == "Sequential"  # with the plugin, it loads
    code, _, err = in_process(export.main, [path, tmp_path / "fx.onnx"], capsys)
    assert code == 2 and "layer 1 ('fx_softsign', from dpnetfx-good 1.0 (plugin 'fxgood')) has no ONNX form" in err
    assert not (tmp_path / "fx.onnx").exists()

    expected = ("its network needs the activation 'fx_softsign' of the plugin dpnetfx-good 1.0 (plugin 'fxgood'), "
                "which is ")
    monkeypatch.setenv("DPNET_DISABLE_PLUGINS", "fxgood")
    registry.reset()
    with pytest.raises(ModelLoadError, match=re.escape(expected + "installed but disabled")):
        load_model(path)
    monkeypatch.delenv("DPNET_DISABLE_PLUGINS")
    for info in site.glob("dpnetfx_good-*.dist-info"):  # uninstalled
        for file in info.iterdir():
            file.unlink()
        info.rmdir()
    registry.reset()
    with pytest.raises(ModelLoadError, match=re.escape(expected + "not installed (pip install dpnetfx-good)")):
        load_model(path)
    np.save(tmp_path / "x.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    for module, extra in ((evaluate, []), (predict, [tmp_path / "x.npy"]), (export, [tmp_path / "m.onnx"])):
        code, _, err = in_process(module.main, [path, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and expected + "not installed" in err, err
    # the same from a fresh process, where the plugin is not installed either
    one_error(cli("evaluate", path, cwd=tmp_path), "dpnet-evaluate", expected + "not installed")


def test_a_plugin_models_checkpoint_loads_from_its_record_or_from_its_configuration(install, site, tmp_path):
    """`--model fx_mlp` (the fixture plugin dpnetfx-models): its Sequential is rebuilt from the recorded architecture
    even without the plugin; a checkpoint holding only the configuration needs the plugin's factory."""
    from dpnet import train
    from dpnet.checkpoint import save_checkpoint
    from dpnet.solver import Solver

    install("models")
    config, _ = train.resolve_config({"model": "fx_mlp", "model_options": {"width": 12}, "dtype": "float64"})
    rng = np.random.default_rng(0)
    data = dict(X_train=rng.standard_normal((40, 3, 32, 32)), y_train=rng.integers(0, 10, 40),
                X_val=rng.standard_normal((10, 3, 32, 32)), y_val=rng.integers(0, 10, 10))
    solver = Solver(train.build_model(config), data, num_epochs=1, batch_size=20, verbose=False, seed=0)
    solver.train()
    path = save_checkpoint(tmp_path / "model.npz", solver, config)
    arrays, meta = load_checkpoint(path)
    assert meta["architecture"]["type"] == "Sequential" and meta["architecture"]["dtype"] == "float64"
    assert meta["providers"] == [dict(kind="model", name="fx_mlp", plugin="fxmodels", distribution="dpnetfx-models",
                                      version="1.0")]
    del meta["architecture"]
    old = tmp_path / "old.npz"
    np.savez(old, meta=np.array(json.dumps(meta)), **arrays)
    X = data["X_val"]
    assert np.array_equal(load_model(old).loss(X), solver.model.loss(X))  # through the plugin's factory
    for info in site.glob("dpnetfx_models-*.dist-info"):  # uninstalled
        for file in info.iterdir():
            file.unlink()
        info.rmdir()
    registry.reset()
    assert np.array_equal(load_model(path).loss(X), solver.model.loss(X))
    with pytest.raises(ModelLoadError, match=re.escape("needs the model 'fx_mlp' of the plugin dpnetfx-models 1.0 "
                                                       "(plugin 'fxmodels'), which is not installed")):
        load_model(old)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.npz").write_text("not a checkpoint\n")
    np.savez(folder / "other.npz", x=np.zeros(3))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.save(folder / "shape.npy", np.zeros((2, 3, 16, 16), dtype=np.uint8))
    np.save(folder / "range.npy", np.full((3, 32, 32), -4.0))
    (folder / "folder.npz").mkdir()
    return folder


CHECKPOINT_CASES = {  # checkpoint (relative to bad_files, or "ok") -> what the message says
    "missing file": ("missing.npz", "checkpoint {dir}/missing.npz does not exist"),
    "not a checkpoint": ("text.npz", "is not a readable dpnet checkpoint: not an .npz archive"),
    "an npz of something else": ("other.npz", "is not a readable dpnet checkpoint"),
    "a folder": ("folder.npz", "is a folder, not a file"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_bad_checkpoint_exits_2_with_one_message(command, case, bad_files, cli):
    name, fragment = CHECKPOINT_CASES[case]
    extra = {"evaluate": [], "predict": [bad_files / "shape.npy"], "export": [bad_files / "m.onnx"]}[command]
    result = cli(command, bad_files / name, *extra, cwd=bad_files)
    one_error(result, f"dpnet-{command}", fragment.format(dir=bad_files))


IMAGE_CASES = {
    "missing image": ("missing.png", "no such file: {dir}/missing.png"),
    "unreadable image": ("broken.png", "cannot read the image {dir}/broken.png"),
    "pickled array": ("objects.npy", "cannot read the array {dir}/objects.npy: not a NumPy .npy file of numbers"),
    "array of another shape": ("shape.npy", "has shape (2, 3, 16, 16): expected images (N, 3, 32, 32)"),
    "array of other values": ("range.npy", "holds values from -4 to -4: pixel values 0..255 expected"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_a_bad_image_exits_2_with_one_message(case, fc_run, bad_files, cli):
    name, fragment = IMAGE_CASES[case]
    result = cli("predict", fc_run["dir"] / "best.npz", bad_files / name, cwd=bad_files)
    one_error(result, "dpnet-predict", fragment.format(dir=bad_files))


@pytest.mark.timeout(120)
def test_missing_packages_and_other_bad_input_are_one_message(fc_run, bad_files, tmp_path, capsys, monkeypatch):
    from dpnet import evaluate, export, predict

    best = fc_run["dir"] / "best.npz"
    (tmp_path / "p.png").write_bytes(b"")
    np.save(tmp_path / "zeros.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    cases = [
        (predict, [best, tmp_path / "zeros.npy", "--top", "0"], "--top must be a positive number of classes"),
        (predict, [best, tmp_path / "zeros.npy", "--top", "11"], "--top 11 is more than the model's 10 classes"),
        (predict, [best, tmp_path / "zeros.npy", "--json", tmp_path / "no" / "p.json"], "the folder"),
        (evaluate, [best, "--data-dir", tmp_path], f"CIFAR-10 not found in {tmp_path}: pass --data-dir"),
        (export, [best, tmp_path / "no" / "m.onnx"], f"the folder {tmp_path / 'no'} does not exist"),
    ]
    with monkeypatch.context() as patch:  # as if Pillow and onnx were not installed
        patch.setitem(sys.modules, "PIL", None)
        patch.setitem(sys.modules, "onnx", None)
        cases += [(predict, [best, tmp_path / "p.png"], "needs Pillow, which the plot extra brings: pip install "
                                                        "'dpnet[plot]'"),
                  (export, [best, tmp_path / "m.onnx"], "needs the onnx package, which the onnx extra brings")]
        for module, argv, fragment in cases:
            code, out, err = in_process(module.main, argv, capsys)
            assert code == 2 and err.count("\n") == 1 and fragment in err and out == "", (argv, out, err)


# ----------------------------------------------------------------------------------------------- did you mean
@pytest.mark.parametrize("argv, expected", [
    (["--activation", "reluu"], "unknown --activation 'reluu'; the choices are: "),
    (["--lr-schedule", "cosin"], "--lr-schedule must be one of exponential, step, cosine, got cosin; did you mean "
                                 "'cosine'?"),
    (["--dtype", "float23"], "argument --dtype: invalid choice: 'float23' (choose from 'float32', 'float64'); did you "
                             "mean"),
])
def test_command_line_name_errors_say_did_you_mean(argv, expected, capsys, clean_registry):
    from dpnet import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err, err
    assert err.rstrip().endswith("?") and "; did you mean '" in err, err
    if argv[0] == "--activation":
        assert "; did you mean 'relu'" in err, err
