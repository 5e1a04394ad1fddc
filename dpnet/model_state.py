"""A model's state beyond its parameters, and copies of the whole: the normalization layers' running statistics
(`norm_state`), kept copies (`copy_into`), loading them (`load_state`), and their agreement across processes
(`average_norm_state`, `average_arrays`, `broadcast_state`).

A state is a dict of arrays keyed "param/<name>" (model.params) and "norm/<layer>/<key>" (model.bn_params[layer]).
"""

import numpy as np

from .parallel import FusedBuffer, bcast_arrays


def norm_state(model):
    """The float arrays of the normalization layers' state (running statistics), by "<layer>/<key>"."""
    return {f"{i}/{key}": value for i, param in enumerate(getattr(model, "bn_params", []))
            for key, value in param.items() if isinstance(value, np.ndarray) and value.dtype.kind == "f"}


def whole_state(params, norm):
    """One state dict from parameters (name -> array) and normalization state ("<layer>/<key>" -> array)."""
    return {**{f"param/{k}": v for k, v in params.items()}, **{f"norm/{k}": v for k, v in norm.items()}}


def split_state(state):
    """(params, norm) of a state dict: the inverse of whole_state."""
    return ({k[len("param/"):]: v for k, v in state.items() if k.startswith("param/")},
            {k[len("norm/"):]: v for k, v in state.items() if k.startswith("norm/")})


def load_state(model, state):
    """Put a state dict's arrays into the model (the arrays themselves, not copies)."""
    params, norm = split_state(state)
    model.params.update(params)
    for name, value in norm.items():
        i, key = name.split("/", 1)
        model.bn_params[int(i)][key] = value


def copy_into(kept, arrays):
    """Copies of `arrays` (name -> array), in `kept`'s arrays where shapes and dtypes match (no allocation at every new
    best), else in new arrays."""
    def copy(name, value):
        old = kept.get(name)
        if isinstance(old, np.ndarray) and old.shape == value.shape and old.dtype == value.dtype \
                and old.flags.writeable:
            np.copyto(old, value)
            return old
        return value.copy()

    return {name: copy(name, value) for name, value in arrays.items()}


def average_norm_state(comm, model):
    """Collective: replace every process's running statistics by their mean over the processes (new arrays), so that
    replicas that normalized their own shards evaluate, and save, the same model."""
    for name, value in average_arrays(comm, norm_state(model)).items():
        i, key = name.split("/", 1)
        model.bn_params[int(i)][key] = value


def average_arrays(comm, arrays):
    """Collective: the mean over the processes of each array of `arrays` (name -> array, the same names and shapes on
    every process), as new arrays of the same dtypes; one allreduce in all."""
    if not arrays:
        return {}
    fused = FusedBuffer(arrays)
    comm.allreduce(fused.pack(arrays, 1 / comm.size))
    return {name: view.astype(arrays[name].dtype, copy=True) for name, view in fused.views.items()}


def broadcast_state(comm, model, state, copies=1, shared=True):
    """Collective: root's (rank 0's) state dict on every process, laid out like the model's own state, as `copies`
    dicts of new arrays on rank 0 and one elsewhere (see dpnet.parallel.bcast_arrays: on one machine, copy-on-write
    mappings of one copy in memory; elsewhere one dict whatever `copies` says)."""
    template = whole_state(model.params, norm_state(model))
    return bcast_arrays(comm, template, state if comm.rank == 0 else None, copies=copies if comm.rank == 0 else 1,
                        shared=shared)
