"""Sequential: a network from any registered layers, built-in or plugin, described as a list.

A spec entry is a layer name (`"relu"`) or a dict `{"layer": name, **options}`. Names resolve to layers of kind
`"layer"` (with parameters and state of their own: the built-in `affine` and `dropout`, and plugins'), or to any
registered activation or normalization, adapted to that kind. See docs/plugins.md, "A layer with weights", for the
contract a plugin layer follows, and docs/architecture.md, "Models", for what a model offers the Solver.
"""

import difflib
import inspect

import numpy as np

from . import layers
from .flip_average import FlipAveraged  # noqa: F401 (dpnet.models.FlipAveraged: test-time flips)
from .plugins import registry
from .plugins.records import Layer
from .solver_checks import accepts_keyword

# Built-in nodes whose forward returns a new array that nothing else holds: a following relu may overwrite it.
_FRESH_OUTPUT = {"affine", "batchnorm", "layernorm"}
_NORM_OPTIONS = {"eps", "momentum"}


# ----------------------------------------------------------------------------------------------- built-in layers
def _affine_init(in_dim, rng, dtype, units, weight_scale=None):
    """W (D, units) ~ N(0, weight_scale^2) (default: He, sqrt(2 / D)), b zeros; D is the flattened input size."""
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
        raise ValueError(f"units must be a positive integer, got {units!r}")
    fan_in = int(np.prod(in_dim))
    scale = np.sqrt(2.0 / fan_in) if weight_scale is None else float(weight_scale)
    return {"W": (scale * rng.standard_normal((fan_in, int(units)))).astype(dtype),
            "b": np.zeros(int(units), dtype=dtype)}, (int(units),)


def _affine_forward(x, params, state):
    return layers.affine_forward(x, params["W"], params["b"])


def _affine_backward(dout, cache, need_dx=True, grads_out=None):
    grads_out = grads_out or {}
    dx, dw, db = layers.affine_backward(dout, cache, need_dx, dw_out=grads_out.get("W"), db_out=grads_out.get("b"))
    return dx, {"W": dw, "b": db}


def _dropout_init(in_dim, rng, dtype, keep):
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the probability of keeping a unit and must be in (0, 1], got {keep!r}")
    return {}, tuple(in_dim)


def _dropout_forward(x, params, state):
    param = {"p": state["options"]["keep"], "mode": state["mode"], "rng": state.get("rng")}
    return layers.dropout_forward(x, param)


def _dropout_backward(dout, cache):
    return layers.dropout_backward(dout, cache), {}


_affine_init.check_options = {"units": 5}  # what dpnet.testing.check_layer checks them with
_dropout_init.check_options = {"keep": 0.6}
AFFINE = Layer("affine", "layer", _affine_forward, _affine_backward, init=_affine_init)
DROPOUT = Layer("dropout", "layer", _dropout_forward, _dropout_backward, init=_dropout_init)


# ----------------------------------------------------------------------------------------------- adapters
def adapt_activation(activation):
    """A Layer of kind "layer" doing what a registered activation does (no parameters, no options)."""
    overwrites = accepts_keyword(activation.forward, "overwrite_x")

    def init(in_dim, rng, dtype):
        return {}, tuple(in_dim)

    def forward(x, params, state):
        if overwrites and state.get("owned_input"):
            return activation.forward(x, overwrite_x=True)
        return activation.forward(x)

    def backward(dout, cache):
        return activation.backward(dout, cache), {}

    return Layer(activation.name, "layer", forward, backward, init=init)


def adapt_normalization(norm):
    """A Layer of kind "layer" doing what a registered normalization does: gamma (ones) and beta (zeros) of the
    features, its state dict (running statistics) the layer's state; options eps and momentum go into the state."""
    def init(in_dim, rng, dtype, **options):
        unknown = sorted(set(options) - _NORM_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; a normalization takes "
                             f"{' and '.join(sorted(_NORM_OPTIONS))}")
        if len(in_dim) != 1:
            raise ValueError(f"a normalization needs inputs of shape (features,), got {tuple(in_dim)}: put an affine "
                             "layer before it")
        return {"gamma": np.ones(in_dim, dtype=dtype), "beta": np.zeros(in_dim, dtype=dtype)}, tuple(in_dim)

    def forward(x, params, state):
        state.update(state["options"])  # eps, momentum: where the normalization's param dict holds them
        return norm.forward(x, params["gamma"], params["beta"], state)

    def backward(dout, cache):
        dx, dgamma, dbeta = norm.backward(dout, cache)
        return dx, {"gamma": dgamma, "beta": dbeta}

    return Layer(norm.name, "layer", forward, backward, init=init)


def resolve(name):
    """The Layer of kind "layer" that a spec's name stands for: a registered one, else an adapted activation or
    normalization. ValueError listing the available names (with "did you mean") when there is none."""
    if not isinstance(name, str):
        raise ValueError(f"a layer name must be a string, got {name!r}")
    found = {kind: registry.available(kind) for kind in ("layer", "activation", "normalization")}
    if name in found["layer"]:
        return registry.get_layer("layer", name)
    if name in found["activation"]:
        return adapt_activation(registry.get_layer("activation", name))
    if name in found["normalization"]:
        return adapt_normalization(registry.get_layer("normalization", name))
    names = sorted({n for table in found.values() for n in table})
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    raise ValueError(f"unknown layer {name!r}{hint} Available layers: {', '.join(names)} (plugins add more: "
                     "python -m dpnet.plugins)")


def normalize_spec(spec):
    """The spec as a list of dicts {"layer": name, **options} (ValueError for anything else)."""
    if isinstance(spec, (str, dict)) or not hasattr(spec, "__iter__"):
        raise ValueError(f"layers must be a list of layer names or {{'layer': name, ...}} dicts, got {spec!r}")
    entries = []
    for i, entry in enumerate(spec):
        if isinstance(entry, str):
            entry = {"layer": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), str):
            raise ValueError(f"layers[{i}] must be a layer name or a dict with a 'layer' name, got {entry!r}")
        entries.append(dict(entry))
    if not entries:
        raise ValueError("layers is empty: a network needs at least one layer")
    return entries


# ----------------------------------------------------------------------------------------------- the model
class _Node:
    """One layer of a Sequential: its record, parameter names (short -> full), state, shapes and call style."""

    def __init__(self, index, entry, label, in_dim, rng, dtype):
        self.index, self.label, self.in_dim = index, label, tuple(in_dim)
        self.name = entry["layer"]
        options = {k: v for k, v in entry.items() if k != "layer"}
        self.layer = resolve(self.name)
        self.what = f"layer {index} ({self.name})"
        try:
            signature = inspect.signature(self.layer.init)
            signature.bind(self.in_dim, rng, np.dtype(dtype), **options)
        except TypeError:
            accepted = [p for p in inspect.signature(self.layer.init).parameters][3:]
            unknown = [k for k in options if k not in accepted] or sorted(options)
            raise ValueError(f"{self.what}: unknown or missing option(s) {', '.join(map(repr, unknown))}; "
                             f"it takes {', '.join(accepted) or 'none'}") from None
        except ValueError:  # no inspectable signature: let the call say what is wrong
            pass
        try:
            params, out_dim = self.layer.init(self.in_dim, rng, np.dtype(dtype), **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.what}: {exc}") from None
        self.params = {key: np.asarray(value) for key, value in dict(params).items()}
        for key, value in self.params.items():
            if value.dtype != np.dtype(dtype):
                raise ValueError(f"{self.what}: init made parameter {key!r} of dtype {value.dtype}, not {dtype}")
        self.out_dim = tuple(int(d) for d in out_dim)
        self.names = {key: f"{label}.{key}" for key in self.params}
        self.state = {"mode": "train", "options": options}
        if self.name == "batchnorm" and len(self.in_dim) == 1:  # as FullyConnectedNet: statistics from the start
            self.state["running_mean"] = np.zeros(self.in_dim, dtype=dtype)
            self.state["running_var"] = np.ones(self.in_dim, dtype=dtype)
        self.fast_backward = accepts_keyword(self.layer.backward, "grads_out")
        self.checked = False


class Sequential:
    """A network of any registered layers, applied in order; the last layer's output is the scores (N, C).

    Inputs:
    - layers: a list of layer names (`"relu"`) or dicts `{"layer": name, **options}` (e.g. `{"layer": "affine",
      "units": 1024}`); see dpnet.models.resolve for the names
    - input_dim: one sample's shape, (3, 32, 32) for CIFAR-10
    - loss: a registered loss name; reg: L2 strength on every parameter with two or more dimensions
    - dtype: of every parameter and computation; seed: of the initialization (None: fresh entropy)
    - label_smoothing: for losses that take `smoothing` (softmax)

    Parameters are named "<layer><k>.<param>", k counting that layer name's uses from 1: "affine1.W",
    "batchnorm1.gamma", "prelu2.alpha". `bn_params` holds every layer's state dict, in order (the name the Solver
    and checkpoints know from FullyConnectedNet). loss(X) returns scores; loss(X, y, grads=None) (loss, grads), y
    (N,) integer labels or, for a loss that takes them (`soft_targets`), (N, C) target distributions.
    """

    dropout_param = None

    def __init__(self, layers, input_dim=(3, 32, 32), loss="softmax", reg=0.0, dtype=np.float32, seed=None,
                 label_smoothing=0.0):
        self.spec = normalize_spec(layers)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a floating-point type, got {self.dtype}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.input_shape = tuple(int(d) for d in np.atleast_1d(input_dim))
        self.input_dim = int(np.prod(self.input_shape))
        self.reg, self.label_smoothing = reg, label_smoothing
        self._loss = registry.get_layer("loss", loss)
        if label_smoothing and "smoothing" not in inspect.signature(self._loss.forward).parameters:
            raise ValueError(f"label_smoothing needs a loss that supports it; the loss {loss!r} does not")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        rng = np.random.default_rng(seed)
        self._nodes, counts, shape = [], {}, self.input_shape
        for index, entry in enumerate(self.spec):
            counts[entry["layer"]] = counts.get(entry["layer"], 0) + 1
            node = _Node(index, entry, f"{entry['layer']}{counts[entry['layer']]}", shape, rng, self.dtype)
            self._nodes.append(node)
            shape = node.out_dim
        if len(shape) != 1:
            raise ValueError(f"the last layer's output must be the scores (classes,), got shape {shape}: end with "
                             "an affine layer")
        self.num_classes = shape[0]
        self.params = {node.names[key]: value for node in self._nodes for key, value in node.params.items()}
        for node in self._nodes:
            del node.params  # the model's dict holds them (the Solver may replace the arrays)
        self.bn_params = [node.state for node in self._nodes]
        for before, node in zip(self._nodes, self._nodes[1:]):
            node.state["owned_input"] = before.name in _FRESH_OUTPUT

    def loss(self, X, y=None, grads=None):
        """Scores (N, C) for X (N, *input_dim) when y is None; else (loss, grads), grads[name] shaped like
        params[name] (written into the given arrays when `grads` is a dict holding one per parameter)."""
        X = np.asarray(X)
        if X.ndim < 2 or X.shape[0] == 0 or int(np.prod(X.shape[1:])) != self.input_dim:
            raise ValueError(f"X has shape {X.shape}: expected a non-empty batch (N, *{self.input_shape})")
        X = X.astype(self.dtype, copy=False).reshape(X.shape[0], *self.input_shape)
        mode = "test" if y is None else "train"
        caches, out = [], X
        for node in self._nodes:
            node.state["mode"] = mode
            params = {key: self.params[full] for key, full in node.names.items()}
            out, cache = node.layer.forward(out, params, node.state)
            if not node.checked:
                self._check_output(node, out, X.shape[0])
            caches.append(cache)
        if not np.isfinite(out).all():
            if not np.isfinite(X).all():
                raise ValueError("X contains NaN or inf")
            raise FloatingPointError("the network produced non-finite scores: the parameters have diverged "
                                     "(try a smaller learning rate)")
        if y is None:
            return out
        smoothing = {"smoothing": self.label_smoothing} if self.label_smoothing else {}
        loss, dout = self._loss.forward(out, y, **smoothing)
        weights = [(name, w) for name, w in self.params.items() if w.ndim >= 2]
        if self.reg:
            loss += 0.5 * self.reg * sum(np.sum(w * w) for _, w in weights)
        grads = {} if grads is None else grads
        for i in range(len(self._nodes) - 1, -1, -1):
            dout = self._backward(self._nodes[i], dout, caches[i], grads, need_dx=i > 0)
        if self.reg:
            for name, w in weights:
                grads[name] += self.reg * w
        return loss, grads

    @property
    def soft_targets(self):
        """Whether the loss takes (N, C) target distributions as y (the softmax does; dpnet.mixing needs it)."""
        return bool(getattr(self._loss.forward, "soft_targets", False))

    def _backward(self, node, dout, cache, grads, need_dx):
        out = {key: grads[full] for key, full in node.names.items() if isinstance(grads.get(full), np.ndarray)}
        if node.fast_backward:
            dx, layer_grads = node.layer.backward(dout, cache, need_dx=need_dx, grads_out=out)
        else:
            dx, layer_grads = node.layer.backward(dout, cache)
        if not node.checked:
            self._check_grads(node, dx, layer_grads, dout, need_dx)
        for key, full in node.names.items():
            value = layer_grads[key]
            if key in out and value is not out[key]:
                out[key][...] = value
            elif key not in out:
                grads[full] = value
        return dx

    def _check_output(self, node, out, n):
        expected = (n, *node.out_dim)
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype != self.dtype:
            raise ValueError(f"{node.what}: forward returned {_describe(out)}, expected a {self.dtype} array of "
                             f"shape {expected}")

    def _check_grads(self, node, dx, layer_grads, dout, need_dx):
        if not isinstance(layer_grads, dict) or set(layer_grads) != set(node.names):
            keys = sorted(layer_grads) if isinstance(layer_grads, dict) else _describe(layer_grads)
            raise ValueError(f"{node.what}: backward returned gradients for {keys}, expected exactly its "
                             f"parameters {sorted(node.names)}")
        for key, full in node.names.items():
            w, g = self.params[full], layer_grads[key]
            if not isinstance(g, np.ndarray) or g.shape != w.shape or g.dtype != w.dtype:
                raise ValueError(f"{node.what}: gradient {key!r} is {_describe(g)}, expected a {w.dtype} array of "
                                 f"shape {w.shape}")
        if need_dx or dx is not None:
            shape = (dout.shape[0], *node.in_dim)
            if not isinstance(dx, np.ndarray) or dx.shape != shape or dx.dtype != self.dtype:
                raise ValueError(f"{node.what}: backward returned dx {_describe(dx)}, expected a {self.dtype} "
                                 f"array of shape {shape}")
        node.checked = True


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"
