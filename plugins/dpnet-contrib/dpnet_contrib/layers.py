"""Layers with parameters of their own, for ``dpnet.models.Sequential`` (kind ``"layer"``).

Each layer is three functions (see docs/plugins.md, "A layer with weights"):

- ``init(in_dim, rng, dtype, **options) -> (params, out_dim)``: one sample's shape in, the parameters (arrays of
  ``dtype``) and one sample's shape out;
- ``forward(x, params, state) -> (out, cache)`` for ``x`` of shape ``(N, *in_dim)``; options the shapes of the
  parameters do not imply are read from ``state["options"]`` (the spec's options; defaults for those not given);
- ``backward(dout, cache) -> (dx, grads)``, ``grads`` with exactly the parameters' keys and shapes.

Each init declares the input shape and options ``dpnet.testing.check_layer`` (and so ``check_plugin``) checks it with
by default, as ``init.check_in_dim`` and ``init.check_options``.

Every function keeps the input's dtype (a float32 model stays float32) and leaves its inputs unmodified; the
backward passes are exact. Inputs of more than one dimension per sample are flattened where a layer says so.
"""

import numpy as np

from dpnet.layers import affine_forward, layernorm_backward, layernorm_forward

PRELU_ALPHA = 0.25
MAXOUT_PIECES = 2
RESIDUAL_EXPANSION = 4
RESIDUAL_ACTIVATION = "gelu"
RESIDUAL_BRANCH_SCALE = 0.1
RESIDUAL_EPS = 1e-5


def _positive_int(name, value):
    try:
        valid = not isinstance(value, (bool, str)) and int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _options(state):
    return state.get("options") or {}


def _matmul_into(a, b, out):
    """a @ b, written into `out` when it is an array (the Sequential's gradient buffer)."""
    return np.matmul(a, b, out=out) if out is not None else a @ b


def _sum_into(a, out):
    return np.sum(a, axis=0, out=out) if out is not None else a.sum(axis=0)


# ----------------------------------------------------------------------------------------------- prelu
def prelu_init(in_dim, rng, dtype, alpha=PRELU_ALPHA):
    """PReLU (He et al. 2015): a learnable negative slope per unit.

    Params: ``alpha`` of shape (D,), D = prod(in_dim), every entry ``alpha`` (option, default 0.25). It is flat even
    for inputs of several dimensions, so that the model's L2 ``reg`` (on parameters of two or more dimensions) never
    decays the slopes. Output shape: in_dim.
    """
    return {"alpha": np.full(int(np.prod(in_dim)), alpha, dtype=dtype)}, tuple(in_dim)


def prelu_forward(x, params, state):
    """out = x where x > 0, else alpha * x (alpha per unit of the flattened sample). x (N, *in_dim) -> out of x's
    shape. Returns (out, (x, alpha))."""
    alpha = params["alpha"]
    x2d = x.reshape(x.shape[0], -1)
    out = np.where(x2d > 0, x2d, alpha * x2d)
    return out.reshape(x.shape), (x, alpha)


def prelu_backward(dout, cache):
    """dx = dout where x > 0, else alpha * dout; dalpha (D,) = sum over the batch of dout * x where x <= 0."""
    x, alpha = cache
    x2d, dout2d = x.reshape(x.shape[0], -1), dout.reshape(x.shape[0], -1)
    dx = np.where(x2d > 0, dout2d, alpha * dout2d).reshape(x.shape)
    dalpha = np.einsum("ij,ij->j", dout2d, np.minimum(x2d, 0))  # x where x <= 0, else 0
    return dx, {"alpha": dalpha}


# ----------------------------------------------------------------------------------------------- maxout
def maxout_init(in_dim, rng, dtype, units, pieces=MAXOUT_PIECES, weight_scale=None):
    """Maxout (Goodfellow et al. 2013): each of ``units`` outputs is the largest of ``pieces`` affine functions of
    the (flattened) input.

    Options: ``units`` (required), ``pieces`` (default 2), ``weight_scale`` (default sqrt(1 / D): the maximum of two
    independent N(0, s^2) values has second moment s^2, so two pieces keep the input's scale as He init does for
    relu). Params: ``W`` (D, units * pieces) ~ N(0, weight_scale^2), column ``u * pieces + p`` being piece p of unit
    u; ``b`` (units * pieces,) zeros. Input (N, *in_dim), D = prod(in_dim); output (N, units).
    """
    units, pieces = _positive_int("units", units), _positive_int("pieces", pieces)
    fan_in = int(np.prod(in_dim))
    scale = np.sqrt(1.0 / fan_in) if weight_scale is None else float(weight_scale)
    return {"W": (scale * rng.standard_normal((fan_in, units * pieces))).astype(dtype),
            "b": np.zeros(units * pieces, dtype=dtype)}, (units,)


def maxout_forward(x, params, state):
    """out[n, u] = max_p (x2d @ W + b)[n, u * pieces + p]. Returns (out (N, units), cache)."""
    pieces = _options(state).get("pieces", MAXOUT_PIECES)
    z, (_, w) = affine_forward(x, params["W"], params["b"])
    z = z.reshape(x.shape[0], -1, pieces)
    winner = z.argmax(axis=2)[:, :, None]
    out = np.take_along_axis(z, winner, axis=2)[:, :, 0]
    return out, (x, w, winner, pieces)


def maxout_backward(dout, cache, need_dx=True, grads_out=None):
    """Each unit's gradient flows to its winning piece only. Returns (dx of x's shape, {"W": (D, units * pieces),
    "b": (units * pieces,)}); dx is None when need_dx is False; gradients go into ``grads_out``'s arrays if given."""
    x, w, winner, pieces = cache
    grads_out = grads_out or {}
    n, units = dout.shape
    dz = np.zeros((n, units, pieces), dtype=dout.dtype)
    np.put_along_axis(dz, winner, dout[:, :, None], axis=2)
    dz = dz.reshape(n, units * pieces)
    dw = _matmul_into(x.reshape(n, -1).T, dz, grads_out.get("W"))
    db = _sum_into(dz, grads_out.get("b"))
    dx = (dz @ w.T).reshape(x.shape) if need_dx else None
    return dx, {"W": dw, "b": db}


# ----------------------------------------------------------------------------------------------- residual
def residual_init(in_dim, rng, dtype, expansion=RESIDUAL_EXPANSION, activation=RESIDUAL_ACTIVATION,
                  branch_scale=RESIDUAL_BRANCH_SCALE, eps=RESIDUAL_EPS):
    """A pre-norm residual MLP block (as in transformers' MLP blocks and ResMLP): out = x + W2 act(W1 LN(x) + b1) + b2.

    Options: ``expansion`` (hidden width H = expansion * D, default 4); ``activation`` (any registered activation
    name, default "gelu", dpnet-contrib's tanh-approximated GELU; "relu" works too); ``branch_scale`` (default 0.1);
    ``eps`` of the layer normalization (1e-5). Needs inputs of shape (D,) (put an affine layer first); output (D,).
    Params: ``gamma`` (D,) ones and ``beta`` (D,) zeros of the layer normalization LN; ``W1`` (D, H) He init
    N(0, 2 / D), ``b1`` (H,) zeros; ``W2`` (H, D) ~ N(0, branch_scale^2 / H), ``b2`` (D,) zeros. The small W2 makes
    the residual branch start at about branch_scale times the normalized input's unit scale, so a fresh block is
    close to the identity and a deep stack of them trains like a shallow network at first; W2 is not zero, so that
    W1 gets gradients from the first step.
    """
    if len(in_dim) != 1:
        raise ValueError(f"the residual block needs inputs of shape (features,), got {tuple(in_dim)}: put an affine "
                         "layer before it")
    expansion = _positive_int("expansion", expansion)
    _activation(activation)
    if not float(branch_scale) >= 0:
        raise ValueError(f"branch_scale must be >= 0, got {branch_scale!r}")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    D = int(in_dim[0])
    H = expansion * D
    params = {
        "gamma": np.ones(D, dtype=dtype),
        "beta": np.zeros(D, dtype=dtype),
        "W1": (np.sqrt(2.0 / D) * rng.standard_normal((D, H))).astype(dtype),
        "b1": np.zeros(H, dtype=dtype),
        "W2": (float(branch_scale) / np.sqrt(H) * rng.standard_normal((H, D))).astype(dtype),
        "b2": np.zeros(D, dtype=dtype),
    }
    return params, (D,)


def _activation(name):
    """The registered activation `name` (dpnet.registry.UnknownNameError, a ValueError, listing them if none)."""
    from dpnet import registry

    return registry.get_layer("activation", name)


def residual_forward(x, params, state):
    """x (N, D) -> out (N, D) = x + W2 act(W1 LN(x) + b1) + b2. Returns (out, cache)."""
    options = _options(state)
    act = _activation(options.get("activation", RESIDUAL_ACTIVATION))
    ln_param = {"mode": state.get("mode", "train"), "eps": options.get("eps", RESIDUAL_EPS)}
    normed, ln_cache = layernorm_forward(x, params["gamma"], params["beta"], ln_param)
    hidden, _ = affine_forward(normed, params["W1"], params["b1"])
    activated, act_cache = act.forward(hidden)
    branch, _ = affine_forward(activated, params["W2"], params["b2"])
    out = branch
    out += x
    return out, (ln_cache, normed, act, act_cache, activated, params["W1"], params["W2"])


def residual_backward(dout, cache):
    """dx = dout + the layer normalization's backward of the branch's gradient. Returns (dx (N, D), grads)."""
    ln_cache, normed, act, act_cache, activated, w1, w2 = cache
    dactivated = dout @ w2.T
    dw2, db2 = activated.T @ dout, dout.sum(axis=0)
    dhidden = act.backward(dactivated, act_cache)
    dnormed = dhidden @ w1.T
    dw1, db1 = normed.T @ dhidden, dhidden.sum(axis=0)
    dx, dgamma, dbeta = layernorm_backward(dnormed, ln_cache)
    dx += dout
    return dx, {"gamma": dgamma, "beta": dbeta, "W1": dw1, "b1": db1, "W2": dw2, "b2": db2}


# ----------------------------------------------------------------------------------------------- lowrank
def lowrank_init(in_dim, rng, dtype, units, rank):
    """A low-rank affine layer: out = x2d @ U @ V + b, i.e. an affine layer whose W = U @ V has rank <= ``rank``,
    with (D + units) * rank weights instead of D * units.

    Options: ``units``, ``rank`` (both required). Params: ``U`` (D, rank) ~ N(0, 1 / D), ``V`` (rank, units)
    ~ N(0, 2 / rank), so that W = U @ V has He's variance 2 / D, and ``b`` (units,) zeros. Input (N, *in_dim),
    flattened to (N, D) with D = prod(in_dim); output (N, units).
    """
    units, rank = _positive_int("units", units), _positive_int("rank", rank)
    fan_in = int(np.prod(in_dim))
    return {"U": (np.sqrt(1.0 / fan_in) * rng.standard_normal((fan_in, rank))).astype(dtype),
            "V": (np.sqrt(2.0 / rank) * rng.standard_normal((rank, units))).astype(dtype),
            "b": np.zeros(units, dtype=dtype)}, (units,)


def lowrank_forward(x, params, state):
    """x (N, *in_dim) -> out (N, units) = (x2d @ U) @ V + b (never forming U @ V). Returns (out, cache)."""
    u, v = params["U"], params["V"]
    x2d = x.reshape(x.shape[0], -1)
    projected = x2d @ u
    out = projected @ v
    out += params["b"]
    return out, (x, u, v, projected)


def lowrank_backward(dout, cache, need_dx=True, grads_out=None):
    """Returns (dx of x's shape, {"U": (D, rank), "V": (rank, units), "b": (units,)}); dx is None when need_dx is
    False; gradients go into ``grads_out``'s arrays if given."""
    x, u, v, projected = cache
    grads_out = grads_out or {}
    dprojected = dout @ v.T
    dv = _matmul_into(projected.T, dout, grads_out.get("V"))
    db = _sum_into(dout, grads_out.get("b"))
    du = _matmul_into(x.reshape(x.shape[0], -1).T, dprojected, grads_out.get("U"))
    dx = (dprojected @ u.T).reshape(x.shape) if need_dx else None
    return dx, {"U": du, "V": dv, "b": db}


prelu_init.check_in_dim = (2, 3)
maxout_init.check_in_dim, maxout_init.check_options = (2, 3), {"units": 4, "pieces": 3}
residual_init.check_in_dim, residual_init.check_options = (6,), {"expansion": 2}
lowrank_init.check_in_dim, lowrank_init.check_options = (2, 3), {"units": 5, "rank": 2}
