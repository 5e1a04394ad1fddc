"""Fully-connected classifiers built from the layers in dpnet.layers.

Architecture: {affine - [norm] - activation - [dropout]} x (L - 1) - affine - loss. The activation, normalization and
loss are resolved by name through dpnet.registry once, at construction, so plugin layers work exactly like built-ins.
"""

import inspect

import numpy as np

from .. import registry
from ..layer_utils import affine_norm_act_backward, affine_norm_act_forward
from ..layers import affine_backward, affine_forward


class FullyConnectedNet:
    """A fully-connected network with any number of hidden layers.

    Parameters live in ``self.params``: ``W1..WL`` (weights), ``b1..bL`` (biases), and with a normalization
    ``gamma1..gamma{L-1}``, ``beta1..beta{L-1}``. The L2 penalty is ``0.5 * reg * sum(W**2)`` over the weights only.
    """

    def __init__(self, hidden_dims, input_dim=3 * 32 * 32, num_classes=10, dropout=1, normalization=None, reg=0.0,
                 weight_scale=1e-2, dtype=np.float32, seed=None, activation="relu", loss="softmax",
                 label_smoothing=0.0):
        """
        Inputs:
        - hidden_dims: list of hidden layer sizes (may be empty: a linear classifier)
        - input_dim: number of input features D (inputs of shape (N, d_1, ..., d_k) are flattened)
        - num_classes: number of classes C
        - dropout: probability of KEEPING a unit after each hidden activation; 1 means no dropout
        - normalization: None or a registered normalization name ('batchnorm', 'layernorm', ...)
        - reg: L2 regularization strength
        - weight_scale: standard deviation of the normal initialization of the weights
        - dtype: dtype of every parameter and computation (float32 to train, float64 for gradient checks)
        - seed: makes the weight initialization and the dropout masks reproducible; None uses NumPy's global RNG
        - activation, loss: registered layer names
        - label_smoothing: eps of label smoothing, for losses that take a `smoothing` keyword (softmax)
        """
        hidden_dims = list(hidden_dims)
        if any(int(h) != h or h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive integers, got {hidden_dims}")
        for name, value in (("input_dim", input_dim), ("num_classes", num_classes)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < dropout <= 1:
            raise ValueError(f"dropout is the keep probability and must be in (0, 1], got {dropout!r}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"dtype must be a floating-point type, got {self.dtype}")

        self.num_layers = len(hidden_dims) + 1
        self.input_dim, self.num_classes = int(input_dim), int(num_classes)
        self.reg = reg
        self.normalization = normalization
        self.use_dropout = dropout != 1
        self._activation = registry.get_layer("activation", activation)
        self._norm = registry.get_layer("normalization", normalization) if normalization is not None else None
        self._loss = registry.get_layer("loss", loss)
        self.label_smoothing = label_smoothing
        if label_smoothing and "smoothing" not in inspect.signature(self._loss.forward).parameters:
            raise ValueError(f"label_smoothing needs a loss that supports it; the loss {loss!r} does not")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")

        rng = np.random.default_rng(seed) if seed is not None else np.random
        dims = [self.input_dim, *hidden_dims, self.num_classes]
        self.params = {}
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            self.params[f"W{i}"] = (weight_scale * rng.standard_normal((fan_in, fan_out))).astype(self.dtype)
            self.params[f"b{i}"] = np.zeros(fan_out, dtype=self.dtype)
            if self._norm is not None and i < self.num_layers:
                self.params[f"gamma{i}"] = np.ones(fan_out, dtype=self.dtype)
                self.params[f"beta{i}"] = np.zeros(fan_out, dtype=self.dtype)

        self.dropout_param = {"mode": "train", "p": dropout} if self.use_dropout else None
        if self.use_dropout and seed is not None:
            self.dropout_param["seed"] = seed
        # One state dict per normalization layer (running statistics for batchnorm); named as in the seed.
        self.bn_params = []
        if self._norm is not None:
            self.bn_params = [{"mode": "train"} for _ in range(self.num_layers - 1)]
            if normalization == "batchnorm":
                for param, dim in zip(self.bn_params, hidden_dims):
                    param["running_mean"] = np.zeros(dim, dtype=self.dtype)
                    param["running_var"] = np.ones(dim, dtype=self.dtype)

    def loss(self, X, y=None, grads=None):
        """Scores, or loss and gradients.

        Inputs:
        - X: (N, d_1, ..., d_k) with d_1 * ... * d_k == input_dim; cast to the model's dtype
        - y: None for test mode, else (N,) integer labels in [0, num_classes), or (N, num_classes) target
          distributions (soft targets, for a loss that takes them: see `soft_targets`)
        - grads: None, or a dict holding, for every parameter name, a writable array shaped like params[name]: the
          gradients are written into these arrays instead of new ones (the Solver passes views of its gradient
          buffer, so a step allocates no parameter-sized array)

        Returns scores (N, C) when y is None, else (loss, grads) with grads[name] shaped like params[name] (the given
        dict, filled in, when grads is given).
        """
        if grads is not None:
            self._check_grads_out(grads)
        X = self._check_input(X)
        mode = "test" if y is None else "train"
        for param in self.bn_params:
            param["mode"] = mode
        if self.dropout_param is not None:
            self.dropout_param["mode"] = mode

        caches = []
        out = X
        for i in range(1, self.num_layers):
            norm_args = {}
            if self._norm is not None:
                norm_args = dict(norm=self._norm, gamma=self.params[f"gamma{i}"], beta=self.params[f"beta{i}"],
                                 norm_param=self.bn_params[i - 1])
            out, cache = affine_norm_act_forward(out, self.params[f"W{i}"], self.params[f"b{i}"], self._activation,
                                                 dropout_param=self.dropout_param, **norm_args)
            caches.append(cache)
        L = self.num_layers
        scores, last_cache = affine_forward(out, self.params[f"W{L}"], self.params[f"b{L}"])
        if not np.isfinite(scores).all():
            self._raise_non_finite(X)
        if y is None:
            return scores

        if self.label_smoothing:
            data_loss, dscores = self._loss.forward(scores, y, smoothing=self.label_smoothing)
        else:
            data_loss, dscores = self._loss.forward(scores, y)
        weights = [self.params[f"W{i}"] for i in range(1, L + 1)]
        loss = data_loss
        if self.reg:
            loss += 0.5 * self.reg * sum(np.sum(w * w) for w in weights)

        # Given arrays (all of them, checked above) receive the gradients; otherwise grads fills up with new ones, and
        # grads.get(name) is None for every name not computed yet.
        grads = {} if grads is None else grads
        dout, grads[f"W{L}"], grads[f"b{L}"] = affine_backward(dscores, last_cache, need_dx=L > 1,
                                                               dw_out=grads.get(f"W{L}"), db_out=grads.get(f"b{L}"))
        for i in range(L - 1, 0, -1):
            # The gradient of the input X is never used: the first layer skips it.
            dout, grads[f"W{i}"], grads[f"b{i}"], dgamma, dbeta = affine_norm_act_backward(
                dout, caches[i - 1], need_dx=i > 1, dw_out=grads.get(f"W{i}"), db_out=grads.get(f"b{i}"))
            if dgamma is not None:
                for name, value in ((f"gamma{i}", dgamma), (f"beta{i}", dbeta)):
                    if name in grads:
                        grads[name][...] = value
                    else:
                        grads[name] = value
        if self.reg:
            for i, w in enumerate(weights, start=1):
                grads[f"W{i}"] += self.reg * w
        return loss, grads

    @property
    def soft_targets(self):
        """Whether the loss takes (N, C) target distributions as y (the softmax does; dpnet.mixing needs it)."""
        return bool(getattr(self._loss.forward, "soft_targets", False))

    def _check_grads_out(self, grads):
        for name, param in self.params.items():
            out = grads.get(name)
            if not (isinstance(out, np.ndarray) and out.shape == param.shape and out.flags.writeable
                    and out.dtype == param.dtype):
                got = f"{type(out).__name__} {getattr(out, 'shape', '')} {getattr(out, 'dtype', '')}".strip()
                raise ValueError(f"grads[{name!r}] must be a writable {param.dtype} array of shape {param.shape}, "
                                 f"got {got}")

    def _check_input(self, X):
        X = np.asarray(X)
        if X.ndim < 2 or int(np.prod(X.shape[1:])) != self.input_dim or X.shape[0] == 0:
            raise ValueError(f"X has shape {X.shape}: expected a non-empty batch (N, d_1, ..., d_k) with "
                             f"d_1 * ... * d_k == input_dim == {self.input_dim}")
        return X.astype(self.dtype, copy=False)

    def _raise_non_finite(self, X):
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or inf")
        raise FloatingPointError("the network produced non-finite scores: the parameters have diverged "
                                 "(try a smaller learning rate or weight_scale)")


class TwoLayerNet(FullyConnectedNet):
    """affine - relu - affine - softmax, in float64, with the seed assignment's signature."""

    def __init__(self, input_dim=3 * 32 * 32, hidden_dim=100, num_classes=10, weight_scale=1e-3, reg=0.0):
        """
        Inputs: input_dim D, hidden_dim H, num_classes C, weight_scale (std of the weight initialization), reg (L2).
        Parameters: W1 (D, H), b1 (H,), W2 (H, C), b2 (C,).
        """
        super().__init__([hidden_dim], input_dim=input_dim, num_classes=num_classes, reg=reg,
                         weight_scale=weight_scale, dtype=np.float64)
