"""The records plugins return and how they are validated: :class:`Layer`, its kinds, and the signature checks.

Shared by the loader (which validates what each hook returns) and by ``dpnet.testing`` (update rule signatures).
"""

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Optional

#: Layer kinds; ``available()`` also accepts ``UPDATE_RULE``.
KINDS = ("activation", "normalization", "loss", "layer")
UPDATE_RULE = "update_rule"

#: What a layer or update rule name must match: a letter, then letters, digits, ``_``, ``-`` or ``.``.
VALID_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

# Positional arguments each kind's functions are called with (backward: None means "must be None").
_CALLS = {
    "activation": (("x",), ("dout", "cache")),
    "normalization": (("x", "gamma", "beta", "param"), ("dout", "cache")),
    "loss": (("scores", "y"), None),
    "layer": (("x", "params", "state"), ("dout", "cache")),
}


def signature_problem(func, args, what, keyword=None, partial=False):
    """None if func can be called with len(args) positional arguments (and the keyword argument, if any), else what
    is wrong. The last of ``args`` is passed by keyword when ``keyword`` is given; with ``partial`` further required
    arguments (options) are allowed."""
    if not callable(func):
        return f"{what} is not callable (got {type(func).__name__})"
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and extension callables have no signature: trust them
        return None
    try:
        sig.bind_partial(*args) if partial else sig.bind(*args)
        if keyword is not None:
            sig.bind(*args[:-1], **{keyword: args[-1]})
    except TypeError as exc:
        call = ", ".join(args[:-1] + (f"{keyword}={args[-1]}",) if keyword else args)
        return f"{what} must be callable as {what.split()[-1]}({call}), but its signature is {sig} ({exc})"
    return None


def layer_problem(layer):
    """What is wrong with a Layer record, or None."""
    if not isinstance(layer.name, str) or not VALID_NAME.match(layer.name):
        return (f"name {layer.name!r} is not a valid layer name (a letter, then letters, digits, '_', '-' or '.', "
                f"so that it can be typed on the command line)")
    if layer.kind not in KINDS:
        return f"kind {layer.kind!r} is not one of {', '.join(KINDS)}"
    if layer.kind == "layer":
        problem = signature_problem(layer.init, ("in_dim", "rng", "dtype"), "init", partial=True)
        if problem:
            return f"a layer of kind 'layer' needs init(in_dim, rng, dtype, **options): {problem}"
    elif layer.init is not None:
        return f"only layers of kind 'layer' have an init (a {layer.kind} layer has no parameters of its own)"
    forward_args, backward_args = _CALLS[layer.kind]
    problem = signature_problem(layer.forward, forward_args, "forward")
    if problem:
        return problem
    if backward_args is None:
        if layer.backward is not None:
            return (f"a {layer.kind} layer returns its gradient from forward, so backward must be None "
                    f"(got {layer.backward!r})")
    elif layer.backward is None:
        return f"a {layer.kind} layer needs a backward function (got None)"
    else:
        return signature_problem(layer.backward, backward_args, "backward")
    return None


@dataclass(frozen=True)
class Layer:
    """A named pair of layer functions, as returned by the ``dpnet_layers`` hook.

    - name: what users type (``activation="swish"``); a letter, then letters, digits, ``_``, ``-`` or ``.``
    - kind: ``"activation"`` | ``"normalization"`` | ``"loss"`` | ``"layer"`` (see ``dpnet.hookspecs.dpnet_layers``
      for the signatures each kind's functions must have)
    - forward, backward: the functions; ``backward`` is None for a loss
    - init: for kind ``"layer"`` only, ``init(in_dim, rng, dtype, **options) -> (params, out_dim)``

    Raises ValueError when the record is malformed (unknown kind, forward not callable, missing backward, ...).
    """

    name: str
    kind: str
    forward: Callable
    backward: Optional[Callable] = None
    init: Optional[Callable] = None

    def __post_init__(self):
        problem = layer_problem(self)
        if problem:
            raise ValueError(f"invalid Layer {self.name!r}: {problem}")
