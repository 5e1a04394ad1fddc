"""Checkpoints: a Solver's whole state in one .npz, written atomically and read without pickle.

Arrays are stored under `param/<name>`, `best/<name>`, `norm/<i>/<key>` (normalization state such as running
statistics), `best_norm/<i>/<key>` (the normalization state that went with the best parameters),
`optim/<name>/<key>` (update-rule state) and `epoch_order`; everything else (counters, histories, scalars of the rule
configs, the seed, the run's configuration) is one JSON document under `meta`.
Floats round-trip exactly through JSON, and the Solver derives its random streams from (seed, epoch), so a run
resumed from a checkpoint taken at an epoch boundary continues bit for bit.
"""

import json
import os
import secrets
import zipfile

import numpy as np

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not match the model it is loaded into."""


def _split_config(config):
    """Split an update-rule config into (arrays, JSON-able scalars)."""
    arrays, scalars = {}, {}
    for key, value in config.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif isinstance(value, (bool, int, float, str, type(None), np.generic)):
            scalars[key] = value.item() if isinstance(value, np.generic) else value
        else:
            raise CheckpointError(f"update-rule state {key!r} of type {type(value).__name__} cannot be saved: "
                                  "rules must keep arrays or scalars in their config")
    return arrays, scalars


def solver_state(solver, config=None):
    """The arrays that describe `solver` completely, as a dict ready for np.savez."""
    model = solver.model
    arrays = {f"param/{name}": value for name, value in model.params.items()}
    arrays.update({f"best/{name}": value for name, value in solver.best_params.items()})
    arrays.update({f"best_norm/{name}": value for name, value in solver.best_norm_state.items()})
    for i, param in enumerate(getattr(model, "bn_params", [])):
        arrays.update({f"norm/{i}/{key}": value for key, value in param.items() if isinstance(value, np.ndarray)})
    optim_scalars = {}
    for name, cfg in solver.optimizer_state().items():
        cfg_arrays, optim_scalars[name] = _split_config(cfg)
        arrays.update({f"optim/{name}/{key}": value for key, value in cfg_arrays.items()})
    if solver.epoch_order is not None:
        arrays["epoch_order"] = solver.epoch_order
    meta = dict(
        format_version=FORMAT_VERSION,
        model=type(model).__name__,
        shapes={name: list(value.shape) for name, value in model.params.items()},
        dtypes={name: value.dtype.str for name, value in model.params.items()},
        epoch=solver.epoch, iteration=solver.iteration, best_val_acc=float(solver.best_val_acc),
        loss_history=[float(v) for v in solver.loss_history],
        train_acc_history=[float(v) for v in solver.train_acc_history],
        val_acc_history=[float(v) for v in solver.val_acc_history],
        optim_scalars=optim_scalars, seed=solver.seed, num_processes=solver.comm.size,
        batch_size=solver.batch_size, num_epochs=solver.num_epochs,
        config=config or {},
    )
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def save_checkpoint(path, solver, config=None):
    """Write the solver's state to `path` atomically: a temporary file in the same folder, fsync, then rename.

    A crash mid-write leaves the previous checkpoint at `path` intact. Returns the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arrays = solver_state(solver, config)
    fd, tmp = _new_temporary_file(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _new_temporary_file(folder):
    """(fd, path) of a new file in folder, open for writing, with the permissions open() would give it (0666 less the
    umask: tempfile.mkstemp's 0600 would leave every checkpoint readable by its writer alone)."""
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(6)}.npz")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


def load_checkpoint(path):
    """Read a checkpoint into (arrays, meta) without unpickling anything; errors name the file."""
    if os.path.exists(path) and not zipfile.is_zipfile(path):  # np.load would call any other file pickled data
        raise CheckpointError(f"checkpoint {path} is not a readable dpnet checkpoint: not an .npz archive, or a "
                              "truncated one")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable dpnet checkpoint: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}, "
                              f"this dpnet reads version {FORMAT_VERSION}")
    return arrays, meta


def _check_matches(path, model, arrays, meta):
    problems = []
    saved = {key[len("param/"):]: arrays[key] for key in arrays if key.startswith("param/")}
    for name in sorted(set(saved) - set(model.params)):
        problems.append(f"{name} is in the checkpoint but not in the model")
    for name in sorted(set(model.params) - set(saved)):
        problems.append(f"{name} is in the model but not in the checkpoint")
    for name in sorted(set(saved) & set(model.params)):
        ours, theirs = model.params[name], saved[name]
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            problems.append(f"{name} is {theirs.dtype}{list(theirs.shape)} in the checkpoint but "
                            f"{ours.dtype}{list(ours.shape)} in the model")
    if meta.get("model") != type(model).__name__:
        problems.append(f"the checkpoint is of a {meta.get('model')}, the model is a {type(model).__name__}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def restore_checkpoint(solver, path):
    """Load the checkpoint at `path` into `solver` (and its model), so that train() continues the saved run.

    Raises CheckpointError, saying what differs, when the checkpoint does not match the model. Returns the saved
    configuration dict (what save_checkpoint was given as `config`).
    """
    arrays, meta = load_checkpoint(path)
    model = solver.model
    _check_matches(path, model, arrays, meta)
    for name in model.params:
        model.params[name] = arrays[f"param/{name}"].copy()
    keep = solver.comm.rank == 0  # only rank 0 keeps the best parameters (see Solver.use_params)
    solver.best_params = {key[len("best/"):]: value for key, value in arrays.items()
                          if key.startswith("best/") and keep}
    solver.best_norm_state = {key[len("best_norm/"):]: value for key, value in arrays.items()
                              if key.startswith("best_norm/") and keep}
    for i, param in enumerate(getattr(model, "bn_params", [])):
        prefix = f"norm/{i}/"
        param.update({key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)})
    for name in model.params:
        config = dict(meta["optim_scalars"].get(name, {}))
        prefix = f"optim/{name}/"
        config.update({key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)})
        solver.optim_configs[name] = config
    solver.epoch_order = arrays.get("epoch_order")
    solver.epoch, solver.iteration = meta["epoch"], meta["iteration"]
    solver.best_val_acc = meta["best_val_acc"]
    solver.loss_history = list(meta["loss_history"])
    solver.train_acc_history = list(meta["train_acc_history"])
    solver.val_acc_history = list(meta["val_acc_history"])
    solver.seed = meta["seed"]
    return meta["config"]
