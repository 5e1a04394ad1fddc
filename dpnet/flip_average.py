"""Test-time flip averaging: a model that scores each image as the average of its scores and its left-right mirror's.

`FlipAveraged(model)` is the model for everything but test-mode scoring: `loss(X, y)` (training) is the inner model's,
unchanged, and every attribute (`params`, `bn_params`, `dropout_param`, `num_classes`, `soft_targets`, `reg`, ...)
is the inner model's, read and written through the wrapper. So the Solver, checkpoints, the average of the parameters
(dpnet.ema), mixing and the replicas' sync checks see the inner model, and training with the wrapper computes the
very same parameters, bit for bit, as training without it. Only `loss(X)` (test mode: the Solver's accuracies, the
best parameters' choice by validation accuracy, dpnet.evaluate, dpnet.predict) changes: it returns

    (model.loss(X) + model.loss(X[..., ::-1])) * 0.5,   X images (N, C, H, W)

the average of the raw scores (linear, so the ONNX graph of dpnet.export is the network on both and an average; the
softmax of the averaged scores is what dpnet.predict reports). The two passes are separate calls, so each is
exactly what the inner model computes for its batch.

`unwrap(model)` is the inner model of a FlipAveraged, else the model itself: what checkpoints record (the inner
model's class and architecture, with `test_flips` beside them) and what dpnet.export translates.
"""

import numpy as np

from .solver_checks import accepts_keyword


class FlipAveraged:
    """`model` whose test-mode scores are the average of each image's and its left-right mirror's (see the module's
    docstring). Raises ValueError when the model declares inputs that are not images (C, H, W): `input_shape` of
    another length (a Sequential of flat vectors, say)."""

    def __init__(self, model):
        if isinstance(model, FlipAveraged):
            raise ValueError("the model already averages the scores of images and their mirrors")
        shape = getattr(model, "input_shape", None)
        if shape is not None and len(tuple(shape)) != 3:
            raise ValueError(f"test-time flips need a model of images (C, H, W); this {type(model).__name__} takes "
                             f"inputs of shape {tuple(shape)}")
        object.__setattr__(self, "model", model)

    def __getattr__(self, name):  # (only for names the wrapper does not have itself: everything but `model`, `loss`)
        return getattr(object.__getattribute__(self, "model"), name)

    def __setattr__(self, name, value):
        if name == "model":
            raise AttributeError("the model a FlipAveraged wraps cannot be replaced: wrap the other model")
        if name == "loss":  # a caller wrapping this model's loss wraps the averaging one, not the inner model's
            object.__setattr__(self, name, value)
        else:
            setattr(self.model, name, value)

    def __delattr__(self, name):
        if name == "loss":
            object.__delattr__(self, name)
        else:
            delattr(self.model, name)

    def __repr__(self):
        return f"FlipAveraged({self.model!r})"

    def __reduce__(self):  # (copy, deepcopy and pickle rebuild it around a copy of the model)
        return FlipAveraged, (self.model,)

    def loss(self, X, y=None, grads=None):
        """Test mode (y None): float (N, C), the average of the inner model's scores of X (N, C, H, W) and of
        X[..., ::-1]. Training (y given): the inner model's loss(X, y), with `grads` (the arrays to write the
        gradients into, as the Solver passes them) handed on when the inner loss takes it, else filled with copies."""
        model = self.model
        if y is not None:
            if grads is None:
                return model.loss(X, y)
            if accepts_keyword(getattr(model.loss, "__func__", model.loss), "grads"):
                return model.loss(X, y, grads=grads)
            loss, computed = model.loss(X, y)
            for name, value in computed.items():
                np.copyto(grads[name], value)
            return loss, grads
        X = np.asarray(X)
        shape = getattr(model, "input_shape", None)
        if X.ndim != 4 or (shape is not None and X.shape[1:] != tuple(shape)):
            wanted = f"(N, {', '.join(map(str, shape))})" if shape is not None else "(N, C, H, W)"
            raise ValueError(f"X has shape {X.shape}: test-time flips need images {wanted}")
        scores = np.array(model.loss(X), copy=True)
        scores += model.loss(X[..., ::-1])
        scores *= 0.5
        return scores


def unwrap(model):
    """The model a FlipAveraged wraps, else `model` itself."""
    return model.model if isinstance(model, FlipAveraged) else model
