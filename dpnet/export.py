"""`python -m dpnet.export CHECKPOINT OUTPUT.onnx`: a trained network, in test mode, as an ONNX graph.

    python -m dpnet.export runs/<run>/best.npz model.onnx

The graph takes `images`, float32 (N, 3, 32, 32), the images with the training's mean image subtracted
(`dpnet.load_model(...).mean_image`; for a run without --zca that is what `model.loss(X)` takes,
dpnet.loading.preprocess), and gives `scores`, float32 (N, classes). A model trained on ZCA-whitened images (--zca: the
checkpoint holds the matrix, `model.zca`) whitens them first, as dpnet.loading.preprocess does: Reshape to (N, 3072),
MatMul by the matrix, Reshape back to (N, 3, 32, 32), before anything else (the mirror branch below included: the
network takes, and --test-flips mirrors, whitened images, as training flips them). Its other operators (opset 17):
affine -> Gemm (after a Flatten where the input has more dimensions), relu -> Relu, batchnorm -> its test-mode
arithmetic on the running statistics, (x - mean) / sqrt(var + eps) * gamma + beta, as Sub, Div, Mul and Add, layernorm
-> LayerNormalization, dropout -> nothing (the identity in test mode). That covers FullyConnectedNet and Sequential
networks of dpnet's built-in layers; any other layer (a plugin's) or model class is an error naming it. Float64
parameters are rounded to float32. A model trained with `--test-flips` (a dpnet.flip_average.FlipAveraged;
`--test-flips`/`--no-test-flips` here decide otherwise) is exported with its mirror branch: the images' left-right
mirrors (a Slice with step -1 on the last axis) are concatenated to the images on the batch axis, the network runs once
on both, and the two halves (Split) are averaged, (a + b) * 0.5, as dpnet does. The model's metadata hold the class
names (`dpnet.classes`), whether it averages with mirrors (`dpnet.test_flips`) and whether it whitens its input
(`dpnet.zca`). The file is written atomically; before that, onnx's checker validates the graph and, when onnxruntime is
installed (the onnx extra: `pip install 'dpnet[onnx]'`), the graph is run on a batch of images and compared with dpnet's
own scores (exit code 1 if they disagree beyond float32 rounding).

Exit codes: 0 done; 1 the exported graph disagrees with dpnet; 2 bad input (one message); 130 interrupted.
"""

import importlib.util
import json
import math
import sys

import numpy as np

from . import __version__
from .config import UsageError
from .model_cli import check_output, command, describe, open_model, parser, write_atomically

PROG = "dpnet-export"
OPSET = 17  # LayerNormalization
IR_VERSION = 8  # the ONNX files of opset 17, readable by onnxruntime 1.13 and newer
SUPPORTED = ("affine", "dropout", "relu", "batchnorm", "layernorm")
CHECK_TOLERANCE = 1e-4  # relative to the largest score: far above float32 rounding, far below any real mistake


class ExportError(ValueError):
    """The model has no ONNX form (a layer or model class the exporter does not know)."""


class _Graph:
    """The nodes and initializers of the graph being built; each op's output gets a fresh name."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.count = [], [], 0

    def const(self, name, array):
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def const_int64(self, name, values):
        self.initializers.append(self.numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(self, op_type, inputs, outputs=1, **attributes):
        """Append an op; returns its output's name (a list of `outputs` names when outputs > 1)."""
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}" + (f"_{k}" if outputs > 1 else "") for k in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, names, **attributes))
        return names[0] if outputs == 1 else names


def _provider(name):
    from .plugins import registry

    for kind in ("layer", "activation", "normalization"):
        who = registry.available(kind).get(name)
        if who is not None:
            return who
    return "an unknown provider"


def _no_onnx_form(index, name):
    return ExportError(f"layer {index} ({name!r}, from {_provider(name)}) has no ONNX form; dpnet exports the "
                       f"layers {', '.join(SUPPORTED)}")


def _layer(graph, x, rank, name, params, state, label):
    """Append the ops of one layer; returns (output, its rank)."""
    if name == "affine":
        if rank > 2:
            x, rank = graph.op("Flatten", [x], axis=1), 2
        return graph.op("Gemm", [x, graph.const(f"{label}.W", params["W"]), graph.const(f"{label}.b", params["b"])]), 2
    if name == "relu":
        return graph.op("Relu", [x]), rank
    if name == "dropout":
        return x, rank
    gamma, beta = graph.const(f"{label}.gamma", params["gamma"]), graph.const(f"{label}.beta", params["beta"])
    eps = state.get("eps", 1e-5)  # what dpnet.layers' normalizations read
    if name == "layernorm":
        return graph.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=float(eps)), rank
    # batchnorm, as dpnet.layers.batchnorm_forward computes it in test mode (std in the parameters' dtype)
    std = np.sqrt(state["running_var"] + eps)
    x = graph.op("Sub", [x, graph.const(f"{label}.running_mean", state["running_mean"])])
    x = graph.op("Div", [x, graph.const(f"{label}.std", std)])
    return graph.op("Add", [graph.op("Mul", [x, gamma]), beta]), rank


def _layers(model):
    """[(index, name, params by short name, state, label)] of a FullyConnectedNet's or Sequential's layers."""
    from .classifiers.fc_net import FullyConnectedNet
    from .models import Sequential

    if type(model) is Sequential:
        layers, counts = [], {}
        for index, (entry, state) in enumerate(zip(model.spec, model.bn_params)):
            name = entry["layer"]
            counts[name] = counts.get(name, 0) + 1
            label = f"{name}{counts[name]}"
            params = {key.split(".", 1)[1]: value for key, value in model.params.items()
                      if key.startswith(label + ".")}
            layers.append((index, name, params, state, label))
        return layers
    if isinstance(model, FullyConnectedNet) and type(model).loss is FullyConnectedNet.loss:
        layers = []
        for i in range(1, model.num_layers + 1):
            layers.append((len(layers), "affine", {"W": model.params[f"W{i}"], "b": model.params[f"b{i}"]}, {},
                           f"affine{i}"))
            if i == model.num_layers:
                break
            if model._norm is not None:
                params = {"gamma": model.params[f"gamma{i}"], "beta": model.params[f"beta{i}"]}
                layers.append((len(layers), model._norm.name, params, model.bn_params[i - 1], f"norm{i}"))
            layers.append((len(layers), model._activation.name, {}, {}, f"activation{i}"))
            if model.use_dropout:
                layers.append((len(layers), "dropout", {}, {}, f"dropout{i}"))
        return layers
    raise ExportError(f"a {type(model).__name__} has no ONNX form: dpnet exports FullyConnectedNet and Sequential "
                      f"networks")


def input_shape(model):
    """One input's shape: (3, 32, 32) for the CIFAR-10 networks."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        shape = (3, 32, 32) if model.input_dim == 3 * 32 * 32 else (model.input_dim,)
    return tuple(int(d) for d in shape)


def to_onnx(model, class_names=None):
    """The onnx.ModelProto of `model` in test mode (see the module's docstring; a FlipAveraged with its mirror
    branch). Raises ExportError naming a layer without an ONNX form; ImportError without the onnx package."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .flip_average import FlipAveraged, unwrap

    flips, net = isinstance(model, FlipAveraged), unwrap(model)
    layers = _layers(net)
    for index, name, _, _, _ in layers:
        if name not in SUPPORTED:
            raise _no_onnx_form(index, name)
    graph, shape = _Graph(helper, numpy_helper), input_shape(net)
    if flips and len(shape) != 3:
        raise ExportError(f"test-time flips need images (C, H, W); the {type(net).__name__} takes inputs of shape "
                          f"{shape}")
    x, rank = "images", 1 + len(shape)
    zca = getattr(net, "zca", None)
    if zca is not None:  # the whitening first: the network takes (and the mirrors are of) whitened images
        size = math.prod(shape)
        if tuple(zca.shape) != (size, size):
            raise ExportError(f"the ZCA matrix is {list(zca.shape)}, not [{size}, {size}] for inputs of shape {shape}")
        rows = graph.op("Reshape", [x, graph.const_int64("zca.rows", [-1, size])])
        x = graph.op("Reshape", [graph.op("MatMul", [rows, graph.const("zca.matrix", zca)]),
                                 graph.const_int64("zca.images", [-1, *shape])])
    if flips:  # the mirrors after the images on the batch axis: one pass of the network over 2N rows
        int64_min = np.iinfo(np.int64).min  # (an end before the first element: the slice runs to index 0)
        mirrored = graph.op("Slice", [x, graph.const_int64("mirror.starts", [-1]),
                                      graph.const_int64("mirror.ends", [int64_min]),
                                      graph.const_int64("mirror.axes", [rank - 1]),
                                      graph.const_int64("mirror.steps", [-1])])
        x = graph.op("Concat", [x, mirrored], axis=0)
    for index, name, params, state, label in layers:
        x, rank = _layer(graph, x, rank, name, params, state, label)
    if flips:  # the two halves' average, (a + b) * 0.5, as dpnet.flip_average computes it
        halves = graph.op("Split", [x], outputs=2, axis=0)
        graph.op("Mul", [graph.op("Add", halves), graph.const("mirror.half", 0.5)])
    graph.nodes[-1].output[0] = "scores"  # the last op's output (dropout adds none, so one exists)
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", *shape])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", int(net.num_classes)])]
    whitened = ", whitened by the training's ZCA matrix" if zca is not None else ""
    averaged = ", averaged with the scores of their left-right mirrors" if flips else ""
    proto = helper.make_model(
        helper.make_graph(graph.nodes, "dpnet", inputs, outputs, initializer=graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dpnet", producer_version=__version__,
        doc_string=f"scores of images (N, 3, 32, 32) from which the training's mean image was subtracted{whitened}"
                   f"{averaged}")
    proto.ir_version = IR_VERSION
    props = {"dpnet.test_flips": json.dumps(flips), "dpnet.zca": json.dumps(zca is not None)}
    if class_names is not None:
        props["dpnet.classes"] = json.dumps(list(class_names))
    helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def graph_inputs_to_model(model, images):
    """What model.loss takes for the graph's input `images` (mean subtracted): the images themselves, or whitened by
    the model's ZCA matrix as dpnet.loading.preprocess whitens them."""
    zca = getattr(model, "zca", None)
    if zca is None:
        return images
    from .data.whitening import whiten

    return whiten(images, zca, np.dtype(next(iter(model.params.values())).dtype))


def check_with_onnxruntime(data, model, images):
    """(onnxruntime's version, the largest |difference| between the serialized graph's scores on `images` (its
    input: mean subtracted) and dpnet's, the largest |score|); None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    theirs = session.run(["scores"], {"images": images.astype(np.float32)})[0]
    ours = model.loss(graph_inputs_to_model(model, images))
    return onnxruntime.__version__, float(np.max(np.abs(theirs - ours))), float(np.max(np.abs(ours)))


def _sample_images(model, count=16):
    """Inputs of the graph, to compare it with dpnet: random pixels minus the mean image (or, without one, values of
    the same spread)."""
    rng = np.random.default_rng(0)
    shape = input_shape(model)
    mean = getattr(model, "mean_image", None)
    if mean is not None and mean.shape == shape:
        pixels = rng.integers(0, 256, size=(count, *shape)).astype(np.float64)
        images = pixels - mean
    else:
        images = 60.0 * rng.standard_normal((count, *shape))
    return images.astype(np.dtype(next(iter(model.params.values())).dtype))


def build_parser():
    result = parser(PROG, "Export a trained network, in test mode, as an ONNX graph: input `images` float32\n"
                          "(N, 3, 32, 32), the training's mean image subtracted (a --zca run's graph whitens them);\n"
                          "output `scores` float32 (N, classes) (with test flips, the average of the images' and\n"
                          "their mirrors' scores).")
    result.add_argument("output", metavar="OUTPUT", help="the ONNX file to write (model.onnx)")
    result.add_argument("--no-check", action="store_true",
                        help="do not compare the graph's scores with dpnet's through onnxruntime")
    return result


def run(argv=None):
    args = build_parser().parse_args(argv)
    check_output(args.output, "output file")
    if importlib.util.find_spec("onnx") is None:  # (without importing it: that takes a while)
        raise UsageError("exporting needs the onnx package, which the onnx extra brings: pip install "
                         "'dpnet[onnx]'")
    model, meta = open_model(args.checkpoint, args.which, args.test_flips)
    try:
        proto = to_onnx(model, model.class_names)
    except ExportError as exc:
        raise UsageError(f"cannot export {args.checkpoint}: {exc}") from None
    data = proto.SerializeToString()
    checked = None if args.no_check else check_with_onnxruntime(data, model, _sample_images(model))
    if checked is not None and checked[1] > CHECK_TOLERANCE * max(1.0, checked[2]):
        print(f"{PROG}: error: the exported graph's scores differ from dpnet's by up to {checked[1]:.3g} (scores up "
              f"to {checked[2]:.3g}): not writing {args.output}; please report this", file=sys.stderr)
        return 1
    write_atomically(args.output, lambda f: f.write(data))
    shape = ", ".join(map(str, input_shape(model)))
    print(f"{PROG}: wrote {args.output}: {describe(model, meta)}, {args.which} parameters; ONNX opset {OPSET}, input "
          f"images float32 (N, {shape}), output scores float32 (N, {model.num_classes})")
    if checked is not None:
        print(f"{PROG}: checked with onnxruntime {checked[0]}: the largest difference from dpnet's scores is "
              f"{checked[1]:.2g} (scores up to {checked[2]:.3g})")
    elif not args.no_check:
        print(f"{PROG}: not checked: onnxruntime is not installed (pip install 'dpnet[onnx]')")
    return 0


main = command(PROG, run)

if __name__ == "__main__":
    sys.exit(main())
