"""The command line's checks of a configuration against number ranges and this machine, before anything is
allocated or created: each raises dpnet.config.UsageError naming the flag (or variable) and the bound.

- `check_ranges(config)`: the seed fits the 64-bit streams, epoch counts are at most MAX_EPOCHS, the crop padding
  leaves image in every crop.
- `check_memory(config)`: the parameters of a FullyConnectedNet or of a `layers` spec's affine layers, times
  MEMORY_FACTOR, fit in the memory available (an estimate made before any array exists).
- `check_blas_threads(config)`: --blas-threads, else $DPNET_BLAS_THREADS / $OPENBLAS_NUM_THREADS / $OMP_NUM_THREADS,
  is a positive integer and at most the cores this process may use (unless --force-blas-threads).
- `check_path(path, what)`: every name in the path fits the file system's NAME_MAX, the whole its PATH_MAX.
"""

import os

import numpy as np

from .config import UsageError, flag, shown

MAX_EPOCHS = 1_000_000
SEED_MAX = 2 ** 63 - 1  # the Solver's streams take the seed as a 64-bit integer
IMAGE_SIDE = 32
# A run holds at least the parameters, their gradients and the best parameters: three copies (the update rule's
# state and the kept final parameters come on top).
MEMORY_FACTOR = 3
INPUT_DIM = 3 * IMAGE_SIDE * IMAGE_SIDE


def _need(condition, config, key, what):
    if not condition:
        raise UsageError(f"{flag(key)} must be {what}, got {shown(config[key])}")


def check_ranges(config):
    _need(config["seed"] <= SEED_MAX, config, "seed", f"between 0 and 2**63 - 1 ({SEED_MAX})")
    for key in ("epochs", "warmup_epochs"):
        _need(config[key] <= MAX_EPOCHS, config, key, f"at most {MAX_EPOCHS}")
    _need(all(m <= MAX_EPOCHS for m in config["lr_milestones"]), config, "lr_milestones", f"at most {MAX_EPOCHS}")
    _need(config["crop_padding"] < IMAGE_SIDE, config, "crop_padding",
          f"between 0 and {IMAGE_SIDE - 1} (the images are {IMAGE_SIDE} pixels wide: with more padding some crops "
          "would hold no image at all)")
    if config.get("timeout") is not None:
        _need(config["timeout"] > 0, config, "timeout", "a number of seconds > 0")


def parameter_count(config):
    """(a lower bound of the number of parameters, the flag that sets it) of the configuration's network, without
    building it; (None, None) for a plugin's --model."""
    if config["model"] is not None:
        return None, None
    if config["layers"] is None:
        dims = [INPUT_DIM, *config["hidden_dims"], 10]
        count = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
        count += 2 * sum(config["hidden_dims"]) if config["normalization"] != "none" else 0
        return count, "hidden_dims"
    count, dim = 0, INPUT_DIM
    for entry in config["layers"]:
        name, options = (entry["layer"], entry) if isinstance(entry, dict) else (entry, {})
        units = options.get("units")
        if name == "affine" and isinstance(units, int) and not isinstance(units, bool) and units > 0:
            count += (dim or 1) * units + units
            dim = units
        elif name not in ("relu", "dropout", "batchnorm", "layernorm"):
            dim = None  # a layer whose output size is not known here: count no more than its successors' biases
    return count, "layers"


def available_memory():
    """Bytes of memory available to a new allocation: MemAvailable of /proc/meminfo, else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _size(nbytes):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def check_memory(config, processes_here=1):
    count, key = parameter_count(config)
    room = available_memory()
    if count is None or room is None:
        return
    itemsize = np.dtype(config["dtype"]).itemsize
    needed = count * itemsize * MEMORY_FACTOR * processes_here
    if needed > room:
        each = f" for each of the {processes_here} processes on this machine" if processes_here > 1 else ""
        raise UsageError(f"{flag(key)} {shown(config[key])} needs at least {_size(needed)} of memory ({count:,} "
                         f"{config['dtype']} parameters, times {MEMORY_FACTOR}: gradients and the best copy{each}), "
                         f"but {_size(room)} are available")


def check_blas_threads(config):
    """The BLAS threads asked for (None: the default share of the cores); UsageError for a malformed or excessive
    number, naming where it comes from."""
    from .parallel.environment import requested_blas_threads, usable_cores

    try:
        n, source = requested_blas_threads(config["blas_threads"])
    except ValueError as exc:
        raise UsageError(str(exc).replace("the number of BLAS threads", "--blas-threads")) from None
    cores = usable_cores()
    if n is not None and n > cores and not config.get("force_blas_threads"):
        where = "--blas-threads" if source == "the argument" else f"${source}"
        instead = "" if source == "the argument" else f"--blas-threads {cores} overrides it, or "
        raise UsageError(f"{where} asks for {n} BLAS threads but this process may use {cores} "
                         f"core{'s' * (cores != 1)}: more threads than cores make every step slower ({instead}pass "
                         f"--force-blas-threads to run so anyway)")
    return n


def check_path(path, what):
    """UsageError unless every name in `path` (absolute) fits the file system's limits."""
    try:
        name_max = os.pathconf("/", "PC_NAME_MAX")
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    text = os.fspath(path)
    if "\0" in text:
        raise UsageError(f"the {what} {text!r} contains a NUL character")
    for part in os.fsencode(text).split(b"/"):
        if len(part) > name_max:
            shown_part = os.fsdecode(part)
            raise UsageError(f"the {what} cannot be created: the name {shown_part[:40]}... in its path is "
                             f"{len(part)} bytes long, more than the {name_max} a file name may have")
    if len(os.fsencode(text)) >= path_max:
        raise UsageError(f"the {what} {text[:60]}... cannot be created: the path is {len(os.fsencode(text))} bytes "
                         f"long, more than the {path_max - 1} a path may have")
