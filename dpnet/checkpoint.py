"""Checkpoints: a Solver's whole state in one .npz, written atomically and read without pickle.

Arrays are stored under `param/<name>`, `best/<name>`, `norm/<i>/<key>` (normalization state such as running
statistics), `best_norm/<i>/<key>` (the normalization state that went with the best parameters),
`optim/<name>/<key>` (update-rule state), `ema/<name>` and `ema_norm/<i>/<key>` (the average of the parameters and
normalization state, dpnet.ema, when the Solver keeps one), `epoch_order`, `mean_image` (the float64 image
subtracted from the training images, when they carry one) and `zca` (the float32 ZCA matrix that then whitened them,
dpnet.data.whitening, when the run had --zca); everything else (counters, histories, scalars of the rule
configs, the seed, the run's configuration, and what dpnet.loading needs to rebuild the model: its architecture and the
plugins providing its layers) is one JSON document under `meta`; with an average also `ema_val_acc_history`,
`ema_iteration` (the step it last took in) and `best_source` ("live" or "ema": where the best parameters come from).
Floats round-trip exactly through JSON, and the Solver derives its random streams from (seed, epoch), so a run
resumed from a checkpoint taken at an epoch boundary continues bit for bit.
"""

import contextlib
import json
import os
import secrets
import signal

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
    average = {}
    if getattr(solver, "ema", None) is not None:
        from .model_state import split_state

        params, norm = split_state(solver.ema.arrays)
        arrays.update({f"ema/{name}": value for name, value in params.items()})
        arrays.update({f"ema_norm/{name}": value for name, value in norm.items()})
        average = dict(ema_val_acc_history=[float(v) for v in solver.ema_val_acc_history],
                       ema_iteration=solver.ema.iteration, best_source=solver.best_source)
    optim_scalars = {}
    for name, cfg in solver.optimizer_state().items():
        cfg_arrays, optim_scalars[name] = _split_config(cfg)
        arrays.update({f"optim/{name}/{key}": value for key, value in cfg_arrays.items()})
    if solver.epoch_order is not None:
        arrays["epoch_order"] = solver.epoch_order
    arrays.update(preprocessing(solver))
    from .flip_average import unwrap
    from .loading import model_record  # (lazily: dpnet.loading imports this module)
    meta = dict(
        format_version=FORMAT_VERSION,
        model=type(unwrap(model)).__name__,  # a FlipAveraged's inner model (test_flips: dpnet.loading.model_record)
        shapes={name: list(value.shape) for name, value in model.params.items()},
        dtypes={name: value.dtype.str for name, value in model.params.items()},
        epoch=solver.epoch, iteration=solver.iteration, best_val_acc=float(solver.best_val_acc),
        loss_history=[float(v) for v in solver.loss_history],
        train_acc_history=[float(v) for v in solver.train_acc_history],
        val_acc_history=[float(v) for v in solver.val_acc_history],
        optim_scalars=optim_scalars, seed=solver.seed, num_processes=solver.comm.size,
        batch_size=solver.batch_size, num_epochs=solver.num_epochs,
        config=config or {}, **model_record(model, config), **average,
    )
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def preprocessing(solver):
    """How the Solver's training images were made from pixels, as a checkpoint records it: {"mean_image": float64
    (C, H, W)} when they carry the image subtracted from them (an ImageArray's, dpnet.data), with "zca": float32 (D, D)
    when they were then whitened by it (dpnet.data.whitening.WhitenedImages); {} otherwise. A ZCA matrix without its
    mean image would not say how to make the model's inputs, so it is recorded only with one."""
    images = getattr(solver, "X_train", None)
    mean_image, zca = getattr(images, "mean_image", None), getattr(images, "zca", None)
    if mean_image is None:
        return {}
    recorded = {"mean_image": np.asarray(mean_image, dtype=np.float64)}
    if zca is not None:
        recorded["zca"] = np.asarray(zca, dtype=np.float32)
    return recorded


def save_checkpoint(path, solver, config=None):
    """Write the solver's state to `path` atomically: a temporary file in the same folder, fsync, then rename.

    A crash mid-write leaves the previous checkpoint at `path` intact. Returns the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arrays = solver_state(solver, config)
    with signals_held():  # Ctrl-C or SIGTERM now would leave the temporary file: they wait for the write (< 1 s)
        fd, tmp = new_temporary_file(folder)
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


@contextlib.contextmanager
def signals_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold `signals` back from this thread inside the block; one that came meanwhile is delivered when it ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def new_temporary_file(folder, suffix=".npz"):
    """(fd, path) of a new file `.tmp-<pid>-<random><suffix>` in folder, open for writing, with the permissions open()
    would give it (0666 less the umask: tempfile.mkstemp's 0600 would leave every checkpoint readable by its writer
    alone). A killed writer's temporaries are found by that name (dpnet.run_outputs.remove_stale_temporaries)."""
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}")


def load_checkpoint(path):
    """Read a checkpoint into (arrays, meta) without unpickling anything and without a read beyond what its members
    declare (dpnet.checkpoint_reader checks the archive, each header and the meta fields, and the mean image and ZCA
    matrix: preprocessing_arrays); errors name the file."""
    from .checkpoint_reader import PREPROCESSING, meta_from, open_archive, preprocessing_arrays, read_member

    archive, members = open_archive(path)
    with archive:
        meta = meta_from(archive, members, path)
        arrays = {key: read_member(archive, member, path, key) for key, member in members.items()
                  if key != "meta" and key not in PREPROCESSING and member.filename.endswith(".npy")}
        arrays.update(preprocessing_arrays(archive, members, path))
    return arrays, meta


def restore_checkpoint(solver, path):
    """Load the checkpoint at `path` into `solver` (and its model), so that train() continues the saved run.

    Raises CheckpointError, saying what differs, when the checkpoint does not match the model, the update rule or the
    data, or holds anything out of place (dpnet.checkpoint_reader.checked_arrays): every array and field is checked
    before anything is restored, and no member is read beyond the size the model gives it. Returns the saved
    configuration dict (what save_checkpoint was given as `config`).
    """
    from .checkpoint_reader import meta_from, checked_arrays, open_archive

    archive, members = open_archive(path)
    with archive:
        meta = meta_from(archive, members, path)
        arrays = checked_arrays(archive, members, path, solver, meta)
    model = solver.model
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
    if getattr(solver, "ema", None) is not None:  # without an average saved, it starts from these parameters
        from .model_state import whole_state

        saved = whole_state(*({key.split("/", 1)[1]: value for key, value in arrays.items() if key.startswith(prefix)}
                              for prefix in ("ema/", "ema_norm/")))
        solver.ema.restore(saved, meta.get("ema_iteration", meta["iteration"]))
        solver.ema_val_acc_history = list(meta.get("ema_val_acc_history", []))
    solver.best_source = meta.get("best_source", "live" if meta["val_acc_history"] else None)
    solver.seed = meta["seed"]
    return meta["config"]
