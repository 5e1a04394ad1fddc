"""Reading a checkpoint without trusting it: no pickle, no read without a bound, nothing restored before all is checked.

A checkpoint is a zip archive of .npy members (np.savez) plus the JSON document `meta` (dpnet.checkpoint). Here:

- `open_archive(path)`: a regular file, a zip archive whose members are unique and do not inflate beyond twice the
  file's size (dpnet stores them uncompressed), with few enough members.
- `read_member(...)`: one .npy member, its header checked (no object or structured dtype; the shape and dtype
  expected, if given; no more bytes than `limit` and than the member declares) before its data are read, and the
  member's CRC checked by reading it to its end.
- `read_meta(path)`: only the `meta` member (at most META_LIMIT bytes), its fields checked (`check_meta`).
- `checked_arrays(path, solver, meta)`: every array a Solver restores, read and checked against the model, the
  update rule and the data of `solver` (`expected_arrays` says what each must be; `_check_whitening`: a run resumed
  with whitened images from a checkpoint of whitened images, by the same ZCA matrix).
- `preprocessing_arrays(...)`: the mean image and the ZCA matrix of the training images (how a trained model's inputs
  are made from pixels), each checked (dtype, shape, size, finite values) before its data are read.

Every failure is a CheckpointError naming the file and what is wrong.
"""

import json
import math
import os
import stat
import zipfile

import numpy as np

from .checkpoint import FORMAT_VERSION, CheckpointError

META_LIMIT = 64 << 20  # bytes of the meta member (histories of about a million iterations)
HEADER_LIMIT = 4096  # bytes of an .npy header (numpy's own limit is 10000)
MAX_MEMBERS = 100_000
PREPROCESSING = ("mean_image", "zca")  # the members saying how the model's inputs are made from pixels
MAX_IMAGE_VALUES = 1 << 16  # values of a mean image (CIFAR-10's: 3 x 32 x 32 = 3072); its ZCA matrix has their square
ZCA_TOLERANCE = 1e-4  # relative to the largest entry: a resumed run's ZCA matrix is the checkpoint's within rounding
_INT64_MAX = 2 ** 63 - 1


def fail_check(path, problem):
    return CheckpointError(f"checkpoint {path} is not a readable dpnet checkpoint: {problem}")


def open_archive(path):
    """(ZipFile, {member name without .npy: ZipInfo}) of the checkpoint at `path`; CheckpointError otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise fail_check(path, "it is not a regular file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise fail_check(path, "not an .npz archive, or a truncated one") from None
    members = archive.infolist()
    names = [member.filename for member in members]
    problem = None
    if len(members) > MAX_MEMBERS:
        problem = f"it has {len(members)} members"
    elif len(set(names)) != len(names):
        problem = "a member name appears twice"
    elif sum(member.file_size for member in members) > 2 * info.st_size + (1 << 20):
        problem = (f"its members would inflate to {sum(m.file_size for m in members)} bytes from a file of "
                   f"{info.st_size} (dpnet writes checkpoints uncompressed)")
    if problem:
        archive.close()
        raise fail_check(path, problem)
    return archive, {name[:-4] if name.endswith(".npy") else name: member for name, member in zip(names, members)}


def read_member(archive, member, path, key, shape=None, dtype=None, limit=None):
    """The array of one .npy member, checked before its data are read: not of an object or structured dtype, of
    `shape` and `dtype` when given, of at most `limit` bytes and of no more than the member holds."""
    if limit is not None and member.file_size > limit + HEADER_LIMIT:
        raise fail_check(path, f"{key} holds {member.file_size} bytes, more than this run's {key} needs ({limit})")
    try:
        with archive.open(member) as f:
            found_shape, fortran, found_dtype = _read_header(f)
            if found_dtype.hasobject or found_dtype.fields is not None:
                raise fail_check(path, f"{key} has the dtype {found_dtype}, which dpnet never writes")
            if shape is not None and tuple(found_shape) != tuple(shape):
                raise CheckpointError(f"checkpoint {path}: {key} has shape {list(found_shape)}, the run needs "
                                      f"{list(shape)}")
            if dtype is not None and found_dtype != np.dtype(dtype):
                raise CheckpointError(f"checkpoint {path}: {key} is {found_dtype}, the run needs {np.dtype(dtype)}")
            nbytes = math.prod(found_shape) * found_dtype.itemsize
            if nbytes > member.file_size or (limit is not None and nbytes > limit):
                raise fail_check(path, f"{key} claims {nbytes} bytes in a member of {member.file_size}"
                            + (f" (this run's {key} needs at most {limit})" if limit is not None else ""))
            data = bytearray(nbytes)
            view, done = memoryview(data), 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise fail_check(path, f"{key} is truncated")
                done += n
            if f.read(1):
                raise fail_check(path, f"{key} has data after its array")
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise fail_check(path, f"{key}: {exc}") from None
    array = np.frombuffer(data, dtype=found_dtype)
    return array.reshape(found_shape, order="F" if fortran else "C")


def meta_from(archive, members, path):
    if "meta" not in members:
        raise fail_check(path, "it has no meta member")
    value = read_member(archive, members["meta"], path, "meta", shape=(), limit=META_LIMIT)
    if value.dtype.kind != "U":
        raise fail_check(path, f"meta is {value.dtype}, not text")
    try:
        meta = json.loads(str(value[()]))
    except (ValueError, RecursionError) as exc:
        raise fail_check(path, f"meta is not JSON: {exc}") from None
    check_meta(meta, path)
    return meta


def read_meta(path):
    """The checked `meta` document of the checkpoint at `path`, reading nothing else."""
    archive, members = open_archive(path)
    with archive:
        return meta_from(archive, members, path)


def _is_int(value, low=0, high=_INT64_MAX):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_fraction(value):
    return _is_number(value) and 0 <= value <= 1


def check_meta(meta, path):
    """CheckpointError unless `meta` has every field a Solver restores, of the right type and range, and consistent
    (as many losses as iterations, an epoch count no larger than the iterations)."""
    if not isinstance(meta, dict):
        raise fail_check(path, f"meta is a {type(meta).__name__}, not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}, this dpnet "
                              f"reads version {FORMAT_VERSION}")
    rules = {
        "model": (lambda v: isinstance(v, str), "a string"),
        "shapes": (lambda v: isinstance(v, dict) and all(isinstance(s, list) and all(_is_int(d) for d in s)
                                                         for s in v.values()), "shapes of the parameters"),
        "dtypes": (lambda v: isinstance(v, dict) and all(isinstance(d, str) for d in v.values()), "dtype names"),
        "epoch": (_is_int, "an integer >= 0"), "iteration": (_is_int, "an integer >= 0"),
        "best_val_acc": (_is_fraction, "a number in [0, 1]"),
        "loss_history": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of finite numbers"),
        "train_acc_history": (lambda v: isinstance(v, list) and all(map(_is_fraction, v)), "a list of fractions"),
        "val_acc_history": (lambda v: isinstance(v, list) and all(map(_is_fraction, v)), "a list of fractions"),
        "optim_scalars": (lambda v: isinstance(v, dict) and all(isinstance(c, dict) and all(
            isinstance(x, (bool, int, float, str, type(None))) for x in c.values()) for c in v.values()),
            "a table of update-rule scalars per parameter"),
        "seed": (_is_int, "an integer in [0, 2**63)"), "num_processes": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "batch_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "num_epochs": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "config": (lambda v: isinstance(v, dict), "a table (the run's configuration)"),
    }
    for key, (ok, what) in rules.items():
        if key not in meta:
            raise fail_check(path, f"meta has no {key}")
        if not ok(meta[key]):
            raise fail_check(path, f"meta {key} must be {what}, got {json.dumps(meta[key])[:80]}")
    if len(meta["loss_history"]) != meta["iteration"]:
        raise fail_check(path, f"meta has {len(meta['loss_history'])} losses for {meta['iteration']} iterations")
    if meta["epoch"] > meta["iteration"] or len(meta["train_acc_history"]) != len(meta["val_acc_history"]):
        raise fail_check(path, f"meta epoch {meta['epoch']}, iteration {meta['iteration']} and its accuracy histories "
                          "do not fit together")
    _check_average_meta(meta, path)
    scored = meta["val_acc_history"] + meta.get("ema_val_acc_history", [])
    if meta["best_val_acc"] not in scored and meta["val_acc_history"]:
        raise fail_check(path, f"meta best_val_acc {meta['best_val_acc']} is none of the validation accuracies")


def _check_average_meta(meta, path):
    """The optional fields of a checkpoint with an average of the parameters (dpnet.ema): ema_val_acc_history (as
    many fractions as val_acc_history, or fewer when the average was started by a resumed run), ema_iteration (the step
    it last took in) and best_source ("live" or "ema", null before any evaluation)."""
    history = meta.get("ema_val_acc_history", [])
    if not (isinstance(history, list) and all(map(_is_fraction, history))
            and len(history) <= len(meta["val_acc_history"])):
        raise fail_check(path, f"meta ema_val_acc_history must be a list of at most {len(meta['val_acc_history'])} "
                         f"fractions, got {json.dumps(history)[:80]}")
    if not _is_int(meta.get("ema_iteration", 0), 0, meta["iteration"]):
        raise fail_check(path, f"meta ema_iteration must be an integer in [0, {meta['iteration']}], got "
                         f"{json.dumps(meta.get('ema_iteration'))[:80]}")
    if meta.get("best_source") not in ("live", "ema", None) or (meta.get("best_source") == "ema" and not history):
        raise fail_check(path, f"meta best_source must be \"live\", or \"ema\" with an ema_val_acc_history, got "
                         f"{json.dumps(meta.get('best_source'))[:80]}")


# ----------------------------------------------------------------------------------------------- preprocessing
def preprocessing_arrays(archive, members, path):
    """{"mean_image": ..., "zca": ...} of those the checkpoint holds, each checked from its header before its data
    are read: the mean image floating point, of 1 to 3 dimensions and at most MAX_IMAGE_VALUES values; the ZCA matrix
    float32 of shape (D, D), D the mean image's number of values (so at most 4 D^2 bytes are read); both finite. A ZCA
    matrix without a mean image is refused: dpnet writes it only with one, the two together making the model's inputs
    from pixels ((images - mean_image).reshape(N, D) @ zca, dpnet.data.whitening)."""
    found = {}
    if "mean_image" in members:
        shape, dtype = _header(archive, members["mean_image"], path, "mean_image")
        if dtype.kind != "f" or not 1 <= len(shape) <= 3 or not 1 <= math.prod(shape) <= MAX_IMAGE_VALUES:
            raise fail_check(path, f"its mean image is {dtype} {list(shape)}, not an image of floating-point values "
                                   f"(at most {MAX_IMAGE_VALUES} of them)")
        found["mean_image"] = read_member(archive, members["mean_image"], path, "mean_image", shape, dtype,
                                          math.prod(shape) * dtype.itemsize)
    if "zca" in members:
        if "mean_image" not in found:
            raise fail_check(path, "it holds a ZCA matrix (zca) but no mean image (mean_image): the model's inputs "
                                   "cannot be made from pixels")
        side = found["mean_image"].size
        shape, dtype = _header(archive, members["zca"], path, "zca")
        if dtype != np.float32 or shape != (side, side):
            raise fail_check(path, f"its ZCA matrix (zca) is {dtype} {list(shape)}, not float32 [{side}, {side}] "
                                   f"(the mean image has {side} values)")
        found["zca"] = read_member(archive, members["zca"], path, "zca", shape, dtype, side * side * 4)
    for key, value in found.items():
        if not np.isfinite(value).all():
            raise fail_check(path, f"its {'mean image' if key == 'mean_image' else 'ZCA matrix (zca)'} holds NaN or "
                                   f"infinite values")
    return found


def _check_whitening(archive, members, path, solver):
    """CheckpointError unless the checkpoint's run and `solver` whiten their training images alike: both not at all,
    or both by the same ZCA matrix (within ZCA_TOLERANCE: recomputed on another machine, it may differ by rounding).
    The configuration check refuses a different --zca; this catches a checkpoint written before --zca existed resumed
    with it, and other training images (another data folder)."""
    from .checkpoint import preprocessing

    ours = preprocessing(solver).get("zca")
    if ours is None and "zca" not in members:
        return
    if ours is None:
        raise CheckpointError(f"checkpoint {path}: its run trained on ZCA-whitened images (it holds their ZCA "
                              f"matrix, zca), this run's are not whitened (--zca 0): resume with the checkpoint's "
                              f"--zca")
    if "zca" not in members:
        raise CheckpointError(f"checkpoint {path}: its run trained on images that were not ZCA-whitened (it holds no "
                              f"ZCA matrix), this run whitens them (--zca): resume without --zca")
    theirs = read_member(archive, members["zca"], path, "zca", ours.shape, np.float32, ours.nbytes)
    if not np.isfinite(theirs).all():
        raise CheckpointError(f"checkpoint {path}: zca holds NaN or infinite values")
    scale = float(np.max(np.abs(ours)))
    if not np.max(np.abs(theirs - ours)) <= ZCA_TOLERANCE * scale:
        raise CheckpointError(f"checkpoint {path}: its ZCA matrix is not the one of this run's training images (the "
                              f"largest difference is {np.max(np.abs(theirs - ours)):.3g}, entries up to "
                              f"{scale:.3g}): other images than its run's, or another --zca")


def _read_header(f):
    """(shape, fortran_order, dtype) of the .npy file open as f, read from its header alone (at most HEADER_LIMIT)."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f, max_header_size=HEADER_LIMIT)


# ----------------------------------------------------------------------------------------------- against a Solver
def _header(archive, member, path, key):
    """(shape, dtype) from an .npy member's header alone."""
    try:
        with archive.open(member) as f:
            shape, _, dtype = _read_header(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise fail_check(path, f"{key}: {exc}") from None
    return tuple(shape), dtype


def _check_model(archive, members, path, model, meta):
    """CheckpointError saying every way the checkpoint's parameters differ from the model's (from headers only)."""
    problems = []
    saved = {key[len("param/"):]: key for key in members if key.startswith("param/")}
    for name in sorted(set(saved) - set(model.params)):
        problems.append(f"{name} is in the checkpoint but not in the model")
    for name in sorted(set(model.params) - set(saved)):
        problems.append(f"{name} is in the model but not in the checkpoint")
    for name in sorted(set(saved) & set(model.params)):
        ours = model.params[name]
        shape, dtype = _header(archive, members[saved[name]], path, saved[name])
        if ours.shape != shape or ours.dtype != dtype:
            problems.append(f"{name} is {dtype}{list(shape)} in the checkpoint but {ours.dtype}{list(ours.shape)} in "
                            f"the model")
    from .flip_average import unwrap

    kind = type(unwrap(model)).__name__  # (a FlipAveraged's checkpoint records the model it wraps)
    if meta["model"] != kind:
        problems.append(f"the checkpoint is of a {meta['model']}, the model is a {kind}")
    if not problems and (meta["shapes"] != {n: list(w.shape) for n, w in model.params.items()}
                         or meta["dtypes"] != {n: w.dtype.str for n, w in model.params.items()}):
        problems.append("its meta shapes or dtypes differ from its arrays")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def _rule_state(rule, optim_config, dtype):
    """({state array key: dtype}, {scalar key: type}) that `rule` keeps for a parameter of `dtype`, learnt by calling
    it once on a 2x3 array; None when the rule cannot be called so (a plugin's)."""
    w = np.linspace(-1.0, 1.0, 6).reshape(2, 3).astype(dtype)
    try:
        _, config = rule(w.copy(), w[::-1].copy(), dict(optim_config))
        arrays = {k: v.dtype for k, v in config.items() if isinstance(v, np.ndarray)}
        scalars = {k: type(v.item() if isinstance(v, np.generic) else v) for k, v in config.items()
                   if not isinstance(v, np.ndarray)}
    except (Exception, SystemExit):  # a plugin's rule that needs more than this: its arrays are checked by shape
        return None
    return arrays, scalars


def expected_arrays(solver, meta):
    """{member: (shape, dtype, required)} of what restoring into `solver` reads, and the update rule's scalars per
    dtype ({dtype: {key: type}} or None where it could not be learnt)."""
    model, expected = solver.model, {}
    from .model_state import norm_state

    evaluated = bool(meta["val_acc_history"])
    for name, w in model.params.items():
        expected[f"param/{name}"] = (w.shape, w.dtype, True)
        expected[f"best/{name}"] = (w.shape, w.dtype, evaluated)
    for key, value in norm_state(model).items():
        expected[f"norm/{key}"] = (value.shape, value.dtype, True)
        expected[f"best_norm/{key}"] = (value.shape, value.dtype, evaluated)
    if getattr(solver, "ema", None) is not None:  # an average: restored if saved (else started afresh)
        expected.update({f"ema/{name}": (w.shape, w.dtype, False) for name, w in model.params.items()})
        expected.update({f"ema_norm/{key}": (value.shape, value.dtype, False)
                         for key, value in norm_state(model).items()})
    states = {dtype: _rule_state(solver.rule, solver.optim_config, dtype)
              for dtype in {w.dtype for w in model.params.values()}}
    for name, w in model.params.items():
        if states[w.dtype] is not None:
            for key, dtype in states[w.dtype][0].items():
                expected[f"optim/{name}/{key}"] = (w.shape, dtype, meta["iteration"] > 0)
    expected["epoch_order"] = ((len(solver.y_train),), None, False)
    return expected, {dtype: state and state[1] for dtype, state in states.items()}


def _optional_member(key, model, scalar_types):
    """(shape, dtype, limit) of a member `expected_arrays` does not name but a restore takes (normalization state a
    layer creates at its first step; update-rule state of a rule that could not be probed), else None."""
    parts = key.split("/")
    biggest = max((w.nbytes for w in model.params.values()), default=0)
    layers = len(getattr(model, "bn_params", []))
    if (parts[0] in ("norm", "best_norm", "ema_norm") and len(parts) == 3 and parts[1].isdigit()
            and int(parts[1]) < layers):
        dtype = next(iter(model.params.values())).dtype
        return None, dtype, biggest
    if parts[0] == "optim" and len(parts) == 3 and parts[1] in model.params:
        w = model.params[parts[1]]
        if scalar_types[w.dtype] is not None:  # the rule was probed: it keeps no such state
            return None
        return w.shape, None, w.nbytes * 2
    return None


def checked_arrays(archive, members, path, solver, meta):
    """The arrays of the checkpoint that restoring into `solver` takes, each read and checked against the model,
    the update rule and the data (CheckpointError for the first problem). Members no restore takes are not read."""
    model = solver.model
    _check_model(archive, members, path, model, meta)
    expected, scalar_types = expected_arrays(solver, meta)
    averaged = getattr(solver, "ema", None) is not None
    arrays = {}
    for key, member in members.items():
        if key.startswith(("ema/", "ema_norm/")) and not averaged:
            continue  # the saved average of a run that kept one: this Solver keeps none
        if key in expected:
            shape, dtype, _ = expected[key]
            limit = None if dtype is None else math.prod(shape) * np.dtype(dtype).itemsize
            arrays[key] = read_member(archive, member, path, key, shape, dtype, limit if key != "epoch_order" else
                                      math.prod(shape) * 8)
        elif key.startswith(("param/", "best/", "norm/", "best_norm/", "optim/", "ema/", "ema_norm/")):
            optional = _optional_member(key, model, scalar_types)
            if optional is None:
                raise CheckpointError(f"checkpoint {path}: {key} is no part of this model's or update rule's state")
            arrays[key] = read_member(archive, member, path, key, optional[0], optional[1], optional[2])
    for key, (_, _, required) in expected.items():
        if required and key not in arrays:
            raise CheckpointError(f"checkpoint {path}: {key} is missing (the run at iteration {meta['iteration']} "
                                  "has it)")
    _check_values(path, arrays, model, meta, solver)
    _check_optim_scalars(path, meta, model, scalar_types)
    _check_whitening(archive, members, path, solver)
    return arrays


def _check_values(path, arrays, model, meta, solver):
    for key, value in arrays.items():
        if key == "epoch_order":
            n = len(solver.y_train)
            if value.dtype.kind not in "iu" or not np.array_equal(np.sort(value), np.arange(n)):
                raise CheckpointError(f"checkpoint {path}: epoch_order is not an order of the {n} training images")
        elif value.dtype.kind != "f":
            raise CheckpointError(f"checkpoint {path}: {key} is {value.dtype}, not floating point")
        elif not np.isfinite(value).all():
            raise CheckpointError(f"checkpoint {path}: {key} holds NaN or infinite values")
        elif key.endswith("/running_var") and (value < 0).any():
            raise CheckpointError(f"checkpoint {path}: {key} holds negative variances")
    best = {key.split("/", 1)[1] for key in arrays if key.startswith("best/")}
    if best and best != set(model.params):
        raise CheckpointError(f"checkpoint {path}: its best parameters are not the model's: "
                              f"{', '.join(sorted(set(model.params) ^ best))}")
    norm = {key.split("/", 1)[1] for key in arrays if key.startswith("norm/")}
    best_norm = {key.split("/", 1)[1] for key in arrays if key.startswith("best_norm/")}
    if best and best_norm != norm:
        raise CheckpointError(f"checkpoint {path}: the normalization state kept with the best parameters differs "
                              f"from the current one: {', '.join(sorted(norm ^ best_norm))}")
    average = {key.split("/", 1)[1] for key in arrays if key.startswith("ema/")}
    average_norm = {key.split("/", 1)[1] for key in arrays if key.startswith("ema_norm/")}
    if (average or average_norm) and (average != set(model.params) or average_norm != norm):
        differ = (set(model.params) ^ average) | (norm ^ average_norm)
        raise CheckpointError(f"checkpoint {path}: its average of the parameters (ema/, ema_norm/) is not the whole "
                              f"state of the model: {', '.join(sorted(differ))}")
    for name in model.params:  # a rule keeps all its state for every parameter, or none yet
        keys = {key for key in arrays if key.startswith(f"optim/{name}/")}
        if meta["iteration"] > 0 and not keys and any(key.startswith("optim/") for key in arrays):
            raise CheckpointError(f"checkpoint {path}: the update rule's state of {name} is missing")
    if meta["batch_size"] == solver.batch_size and meta["epoch"] != meta["iteration"] // solver.iterations_per_epoch:
        raise CheckpointError(f"checkpoint {path}: meta epoch {meta['epoch']} does not fit iteration "
                              f"{meta['iteration']} ({solver.iterations_per_epoch} iterations per epoch)")


def _check_optim_scalars(path, meta, model, scalar_types):
    for name, scalars in meta["optim_scalars"].items():
        if name not in model.params:
            raise CheckpointError(f"checkpoint {path}: meta optim_scalars names {name!r}, which is not a parameter")
        types = scalar_types[model.params[name].dtype]
        for key, value in scalars.items():
            if types is None:
                continue
            wanted = types.get(key)
            if wanted is None:
                raise CheckpointError(f"checkpoint {path}: meta optim_scalars {name}.{key} is no setting of the "
                                      "update rule")
            ok = (_is_number(value) if wanted is float else _is_int(value) if wanted is int
                  else isinstance(value, wanted))
            if not ok or (key == "learning_rate" and value < 0):
                kind = {float: "a finite number", int: "an integer >= 0", bool: "true or false"}.get(
                    wanted, f"a {wanted.__name__}")
                raise CheckpointError(f"checkpoint {path}: meta optim_scalars {name}.{key} must be {kind}"
                                      f"{' >= 0' * (key == 'learning_rate')}, got {value!r}")
