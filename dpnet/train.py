"""The command line: train a network on CIFAR-10, in one process or many.

    python -m dpnet.train                          # the tuned default run (also installed as `dpnet-train`)
    mpiexec -n 4 python -m dpnet.train --epochs 5  # four processes, data parallel (global batch unchanged)
    python -m dpnet.train --config configs/smoke.toml
    python -m dpnet.train --resume runs/<run>/last.npz
    python -m dpnet.train --layers affine:units=512,batchnorm,relu,affine:units=10 --optim momentum=0.8

The network is a FullyConnectedNet (--hidden-dims, --activation, --normalization, --dropout, --weight-scale), a
dpnet.models.Sequential of any registered layers (--layers), or a network a plugin provides (--model, with
--model-option); the update rule's hyper-parameters other than the learning rate (--lr) come from --optim.

A run writes into its log directory (default `runs/<timestamp>-<short config>`): the TensorBoard event file, the
resolved configuration (`config.toml`, reusable with --config), the checkpoints `last.npz` and `best.npz`, and the
loss/accuracy plot `curves.png`. It ends by printing the test accuracy of the best parameters (by validation
accuracy). Only rank 0 prints and writes.

Configuration (dpnet.config): its DEFAULTS, then the configuration saved in the --resume checkpoint, then the --config
TOML file (its keys are the flag names, with '-' or '_'), then the flags given. A resumed run continues the saved
configuration; only the keys in RESUME_MAY_CHANGE may differ from it. Where a run writes comes from this invocation
only: without --logdir a resumed run continues in the folder of the checkpoint it resumes.

Exit codes (docs/bad-input.md has every case): 0 done; 2 bad input (nothing was trained); 3 the loss or the
parameters became NaN or inf (the last good checkpoint is kept); 4 done, but an output (events, checkpoint, plot,
config.toml) could not be written, as reported; 124 a process was late in a collective (--timeout); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM).
"""

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .config import (MODEL_RUN_KEYS, NUM_VALIDATION, OUTPUT_DIRS, UsageError, agree, build_parser, resolve_dirs, shown,
                     to_toml)
from .config import DEFAULTS, EXIT_BAD_INPUT, LOCATION_KEYS, flag  # noqa: F401 (re-exported: tests, benchmarks)
from .config_checks import check_config, mixing_key, model_keywords
from .config_sources import load_toml, resolve_config  # noqa: F401 (load_toml re-exported: tests use it)
from .parallel.watchdog import EXIT_TIMEOUT  # noqa: F401 (an exit code of the command)

EXIT_DIVERGED, EXIT_OUTPUT_FAILED, EXIT_INTERRUPTED = 3, 4, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # (and EXIT_TIMEOUT, 124: a late process, dpnet.parallel.watchdog)


class Terminated(KeyboardInterrupt):
    """SIGTERM in a single process: handled as Ctrl-C is (the run says how to resume), with exit code 143."""


# ----------------------------------------------------------------------------------------------- the data
def _data_error(exc):
    return UsageError(f"cannot load CIFAR-10: {exc}")


def locate_data(config, rank, quiet):
    """The CIFAR-10 folder. It is downloaded (by rank 0, the others wait) only into the default location, or with
    --download."""
    from . import data_utils

    download = config["download"] or (config["data_dir"] is None and not os.environ.get(data_utils.DATA_DIR_ENV))
    if rank == 0 and download and not quiet:
        try:
            data_utils.find_data_dir(config["data_dir"])
        except data_utils.CIFAR10NotFoundError:
            print("dpnet-train: CIFAR-10 is missing; downloading it (about 170 MB, once)", flush=True)
    try:
        found = data_utils.locate_CIFAR10(config["data_dir"], download=download, progress=False if quiet else None)
    except data_utils.CIFAR10NotFoundError as exc:
        if exc.incomplete is not None:
            missing = [n for n in data_utils.REQUIRED_FILES if not (exc.incomplete / n).is_file()]
            raise UsageError(f"CIFAR-10 in {exc.incomplete} is incomplete: {', '.join(missing)} missing (remove the "
                             "folder to download it again)") from None
        where = (f"--data-dir {config['data_dir']}" if config["data_dir"] is not None
                 else f"${data_utils.DATA_DIR_ENV}={os.environ.get(data_utils.DATA_DIR_ENV)}")
        raise UsageError(f"CIFAR-10 not found in {where} (looked for data_batch_1..5 and test_batch there and in its "
                         f"{data_utils.CIFAR10_FOLDER} folder): pass --download to download it there, or point "
                         f"--data-dir at the folder holding {data_utils.CIFAR10_FOLDER}") from None
    except (OSError, ValueError) as exc:
        raise _data_error(exc) from None
    return str(found)


def load_data(folder, config):
    from .data_utils import get_CIFAR10_data

    try:
        data = get_CIFAR10_data(num_training=config["num_train"], num_validation=NUM_VALIDATION, num_test=10000,
                                data_dir=folder, dtype=np.dtype(config["dtype"]), lazy=True, download=False)
    except (OSError, ValueError) as exc:
        raise _data_error(exc) from None
    if config["zca"]:
        from .data.whitening import whitened_data

        data = whitened_data(data, config["zca"], np.dtype(config["dtype"]))
    return data


INPUT_SHAPE = (3, 32, 32)


def build_model(config):
    """The configuration's network: the plugin model `model` (its factory called with `model_options` and the run's
    values of the MODEL_RUN_KEYS it takes), a dpnet.models.Sequential of `layers`, or else the FullyConnectedNet of
    the FC_KEYS; with `test_flips`, wrapped in a dpnet.flip_average.FlipAveraged. UsageError when it cannot be built
    (also for want of memory, or a plugin's failure), when --mixup or --cutmix is on and its loss takes no soft
    targets, or when --test-flips is on and it takes inputs other than images."""
    try:
        model = _build_model(config)
    except MemoryError as exc:
        raise UsageError(f"not enough memory to build the network ({exc})") from None
    key = mixing_key(config)
    if key and not getattr(model, "soft_targets", False):
        raise UsageError(f"{flag(key)} {shown(config[key])} needs a model whose loss takes soft targets "
                         f"(model.soft_targets, as the softmax's do); the {type(model).__name__} of the run does not")
    if config["test_flips"]:
        from .flip_average import FlipAveraged

        try:
            return FlipAveraged(model)
        except ValueError as exc:
            raise UsageError(f"--test-flips: {exc}") from None
    return model


def _build_model(config):
    if config["model"] is not None:
        return _build_plugin_model(config)
    if config["layers"] is not None:
        from .models import Sequential

        try:
            return Sequential(config["layers"], input_dim=INPUT_SHAPE, loss=config["loss"], reg=config["reg"],
                              dtype=np.dtype(config["dtype"]), seed=config["seed"],
                              label_smoothing=config["label_smoothing"])
        except ValueError as exc:
            raise UsageError(f"--layers {shown(config['layers'])}: {exc}") from None
        except (Exception, SystemExit) as exc:  # a plugin layer's init: report it, do not crash
            if isinstance(exc, MemoryError):
                raise
            raise UsageError(f"--layers {shown(config['layers'])}: a layer failed to initialize: "
                             f"{type(exc).__name__}: {exc}") from None
    from .classifiers.fc_net import FullyConnectedNet

    norm = None if config["normalization"] == "none" else config["normalization"]
    return FullyConnectedNet(config["hidden_dims"], dropout=config["dropout"], normalization=norm, reg=config["reg"],
                             weight_scale=config["weight_scale"], dtype=np.dtype(config["dtype"]),
                             seed=config["seed"], activation=config["activation"], loss=config["loss"],
                             label_smoothing=config["label_smoothing"])


def _build_plugin_model(config):
    from .registry import get_model

    name = config["model"]
    factory = get_model(name)
    names, any_keyword = model_keywords(factory)
    run = {"input_dim": INPUT_SHAPE, "loss": config["loss"], "reg": config["reg"],
           "label_smoothing": config["label_smoothing"], "dtype": np.dtype(config["dtype"]), "seed": config["seed"]}
    if names is None:  # no inspectable signature: the options only
        given = {}
    else:
        given = {key: run[key] for key in MODEL_RUN_KEYS if any_keyword or key in names}
    try:
        model = factory(**given, **config["model_options"])
    except (Exception, SystemExit) as exc:  # the plugin's code: whatever it raises is its failure, not a crash
        if isinstance(exc, MemoryError):
            raise
        options = f" with {shown(config['model_options'])}" if config["model_options"] else ""
        text = str(exc) if isinstance(exc, (TypeError, ValueError)) else f"{type(exc).__name__}: {exc}"
        raise UsageError(f"cannot build the model {name!r}{options}: {text}") from None
    params = getattr(model, "params", None)
    if not isinstance(params, dict) or not params or not callable(getattr(model, "loss", None)):
        raise UsageError(f"the factory of the model {name!r} returned a {type(model).__name__}, not a model (an "
                         f"object with a dict of parameters `params` and a method `loss`)")
    dtypes = sorted({str(np.asarray(value).dtype) for value in params.values()})
    if dtypes != [config["dtype"]]:
        untaken = "" if "dtype" in given else "; its factory does not take dtype"
        raise UsageError(f"the model {name!r} has {', '.join(dtypes)} parameters but the run is {config['dtype']} "
                         f"(--dtype){untaken}")
    return model


def make_lr_schedule(config):
    """The learning-rate schedule of the configuration: a factor per iteration (see dpnet.schedules)."""
    from .schedules import make_schedule

    per_epoch = max(config["num_train"] // config["batch_size"], 1)
    return make_schedule(config["lr_schedule"], total_iterations=config["epochs"] * per_epoch,
                         warmup_iterations=round(config["warmup_epochs"] * per_epoch), decay=config["lr_decay"],
                         milestones=[m * per_epoch for m in config["lr_milestones"]], iterations_per_epoch=per_epoch)


# ----------------------------------------------------------------------------------------------- the run
def _stop_diverged(comm, solver, exc, last):
    message = str(exc)
    if "iteration" not in message:
        message += f" (after iteration {solver.iteration})"
    kept = f"; the last good checkpoint is {last}" if last and os.path.exists(last) else ""
    text = f"dpnet-train: error: training diverged: {message}{kept}"
    if comm.size == 1:
        print(text, file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    # Another rank may be waiting in a collective: end the job. Rank 0 speaks first; the others only if rank 0 did
    # not end the job within a moment (it failed elsewhere or not at all).
    if comm.rank != 0:
        time.sleep(2.0)
    print(f"{text} (rank {comm.rank})" if comm.rank else text, file=sys.stderr, flush=True)
    comm.abort(EXIT_DIVERGED)


def make_dir(path, what):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"the {what} {path} cannot be written: {exc.strerror or exc}") from None


def prepare_folders(config):
    """Rank 0, once the input is known to be good: create the log and checkpoint folders and remove the temporary
    files a killed run left there."""
    from .run_outputs import remove_stale_temporaries

    for key, what in OUTPUT_DIRS.items():
        make_dir(config[key], what)
    for folder in dict.fromkeys((config["logdir"], config["checkpoint_dir"])):
        removed = remove_stale_temporaries(folder)
        if removed and not config["quiet"]:
            size = sum(nbytes for _, nbytes in removed) / 2 ** 20
            print(f"dpnet-train: removed {len(removed)} temporary file{'s' * (len(removed) > 1)} ({size:.1f} MB) "
                  f"that a killed run left in {folder}: {', '.join(name for name, _ in removed)}", flush=True)


def setup(comm, argv):
    """Everything before training, checked on every process: (config, the resumed checkpoint's meta or None, data,
    model). Bad input ends all processes with exit code 2 (see agree). Nothing is created yet."""
    given = vars(build_parser(comm.rank).parse_args(argv))

    def configure():
        config, meta = resolve_config(given)
        check_config(config, comm.size)  # also the BLAS threads asked for (dpnet.run_checks)
        if comm.rank == 0:
            resolve_dirs(config)
        return config, meta

    config, meta = agree(comm, configure)
    from .parallel import set_blas_threads

    config["blas_threads"] = set_blas_threads(config["blas_threads"], comm=comm)
    folder = agree(comm, lambda: locate_data(config, comm.rank, config["quiet"]) if comm.rank == 0 else None)
    folder = agree(comm, lambda: locate_data(config, comm.rank, True) if comm.rank else folder)
    data = agree(comm, lambda: load_data(folder, config))
    model = agree(comm, lambda: build_model(config))
    return config, meta, data, model


def make_solver(comm, config, meta, data, model, outputs):
    """The Solver with its monitors (rank 0), restored from config['resume'] if given: (solver, tensorboard monitor,
    checkpoint monitor), both guarded by `outputs` (dpnet.run_outputs.Outputs); None on other ranks."""
    from .checkpoint import CheckpointError, restore_checkpoint
    from .augment import Augmentation
    from .mixing import Mixing
    from .monitor import CheckpointMonitor, ProgressMonitor, TensorBoardMonitor
    from .registry import get_update_rule
    from .parallel import is_shardable
    from .solver import Solver

    monitors, tensorboard, checkpoints = [], None, None
    if comm.rank == 0:
        per_run = ("resume", "blas_threads", "force_blas_threads", "timeout")
        saved = {k: v for k, v in config.items() if k not in per_run}  # what a resume reuses
        checkpoints = outputs.checkpoints(CheckpointMonitor(config["checkpoint_dir"], config["checkpoint_every"],
                                                            saved))
        tensorboard = outputs.tensorboard(TensorBoardMonitor(config["logdir"], "```toml\n" + to_toml(config) + "```"))
        # TensorBoard before the checkpoints: the events of a checkpointed epoch are on disk.
        monitors = [ProgressMonitor(quiet=config["quiet"]), tensorboard, checkpoints]
    shard = config["shard_optimizer"] and is_shardable(get_update_rule(config["update_rule"]))
    optim_config = {"learning_rate": config["lr"], **config["optim"]}
    solver = Solver(model, data, update_rule=config["update_rule"], optim_config=optim_config,
                    batch_size=config["batch_size"], num_epochs=config["epochs"], num_train_samples=1000,
                    num_val_samples=None, verbose=False, seed=config["seed"], comm=comm, monitors=monitors,
                    lr_schedule=make_lr_schedule(config), weight_decay=config["weight_decay"],
                    shard_optimizer=shard, shared_memory=config["shared_memory"],
                    augment=Augmentation(crop_padding=config["crop_padding"]) if config["augment"] else None,
                    mixing=Mixing(config["mixup"], config["cutmix"], config["mix_probability"],
                                  config["cutmix_probability"]) if mixing_key(config) else None,
                    ema_decay=config["ema"] or None, ema_every=config["ema_every"])

    def restore():
        try:
            restore_checkpoint(solver, config["resume"])
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None

    if meta is not None:
        agree(comm, restore)
        if tensorboard is not None:
            tensorboard.purge_step = solver.iteration + 1  # hide what the interrupted run logged after its checkpoint
    return solver, tensorboard, checkpoints


def _resume_hint(config, checkpoints):
    """"; resume with: ..." naming the last checkpoint (and the log folder, when it is elsewhere), or ""."""
    last = checkpoints.last_path if checkpoints is not None else None
    if not last or not os.path.exists(last):
        return ""
    logdir = f" --logdir {config['logdir']}" if config["logdir"] != config["checkpoint_dir"] else ""
    return f"; resume with: python -m dpnet.train --resume {last}{logdir}"


def _watchdog(comm, timeout):
    """Collective: the collective watchdog of --timeout (dpnet.parallel.watchdog), or None."""
    from .parallel.watchdog import start_watchdog

    try:
        return start_watchdog(comm, timeout, prefix="dpnet-train: error")
    except RuntimeError as exc:
        raise UsageError(f"--timeout {timeout:g}: {exc}") from None


def _terminate(signum, frame):
    raise Terminated()


def run(argv=None):
    """The whole command; returns the exit code (bad input raises SystemExit(2)). In one process SIGTERM is handled as
    Ctrl-C is, with its own exit code."""
    from .parallel import get_communicator

    comm = get_communicator()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if comm.size == 1 and main_thread else None
    try:
        return _run(comm, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(comm, argv):
    from .parallel.failures import set_abort_note
    from .run_outputs import Outputs, describe, final_report, write_atomically

    config, meta, data, model = setup(comm, argv)
    watchdog = agree(comm, lambda: _watchdog(comm, config["timeout"]))
    outputs = Outputs()
    solver, tensorboard, checkpoints = make_solver(comm, config, meta, data, model, outputs)
    # The folders are created only now that the input, the resumed checkpoint included, is known to be good.
    agree(comm, lambda: prepare_folders(config) if comm.rank == 0 else None)
    if comm.size > 1:  # SIGINT and SIGTERM end the job (dpnet.parallel.failures): say how to resume
        set_abort_note(lambda: _resume_hint(config, checkpoints) if comm.rank == 0 else "")
    if comm.rank == 0:
        toml = os.path.join(config["logdir"], "config.toml")
        text = to_toml(config).encode()
        outputs.attempt(toml, "the run goes on without it", write_atomically, toml, lambda f: f.write(text))
        if not config["quiet"]:
            print(describe(comm, config, meta, solver), flush=True)
    start = time.perf_counter()
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # divergence is detected and reported
            solver.train()
    except FloatingPointError as exc:
        return _stop_diverged(comm, solver, exc, checkpoints and checkpoints.last_path)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\ndpnet-train: {what} at iteration {solver.iteration}{_resume_hint(config, checkpoints)}",
              file=sys.stderr, flush=True)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    finally:
        if tensorboard is not None:
            tensorboard.flush()
    test_acc = solver.check_accuracy(data["X_test"], data["y_test"])  # the best parameters, which train() loaded
    solver.use_params("final")
    final_acc = solver.check_accuracy(data["X_test"], data["y_test"])
    solver.use_params("best")
    if watchdog is not None:
        watchdog.stop()
    if comm.rank == 0:
        try:
            final_report(comm, solver, config, (test_acc, final_acc), tensorboard, outputs,
                         time.perf_counter() - start)
        finally:
            tensorboard.close()
    return EXIT_OUTPUT_FAILED if outputs.failed else 0


def main(argv=None):
    """Entry point of `python -m dpnet.train` and `dpnet-train`: returns the exit code (argparse and bad input raise
    SystemExit(2))."""
    try:
        return run(argv)
    except Terminated:
        print("\ndpnet-train: terminated (SIGTERM)", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\ndpnet-train: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
