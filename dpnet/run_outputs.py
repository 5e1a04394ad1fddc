"""What a command-line run writes, and how each output fails on its own (rank 0 only).

- `check_output_folders(config)`: refuse log and checkpoint folders that hold another run's checkpoints or events
  (UsageError), unless the run resumes the checkpoint of that folder.
- `remove_stale_temporaries(folder)`: the `.tmp-<pid>-*` files that a killed writer left (its process is gone).
- `write_atomically(path, write)`: a temporary file in the same folder, then a rename, as checkpoints are written:
  a symbolic link planted at `path` is replaced, never followed.
- `Outputs`: wraps the TensorBoard and checkpoint monitors so that a failing write (a full disk, an I/O error) prints
  one message and stops only that output: the events and the plot are given up, a checkpoint is tried again at the
  next epoch where one is due (the previous one is kept). `failed` lists what failed (the run's exit code says so).
- `final_report(...)`: the hyper-parameters with the final metrics, curves.png, and the closing lines.
"""

import glob
import os
import re
import sys
from pathlib import Path

from .config import UsageError

CHECKPOINT_FILES = ("last.npz", "best.npz")
_TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]+\.\w+\Z|.+\.npz\.tmp-(\d+)\Z")  # checkpoint.py, monitor.py's names


# ----------------------------------------------------------------------------------------------- folders
def _same_folder(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_folders(config):
    """UsageError when the log or checkpoint folder holds another run's checkpoints (a run that resumes the
    checkpoint of that folder excepted), or, for a new run, when the log folder holds a run's events or config.toml:
    this run would overwrite them, or mix its events with theirs."""
    resume = config["resume"]
    resume_dir = Path(resume).expanduser().absolute().parent if resume else None
    for key in dict.fromkeys(("checkpoint_dir", "logdir") if config["checkpoint_dir"] != config["logdir"]
                             else ("logdir",)):
        folder, option = Path(config[key]), "--" + key.replace("_", "-")
        what = "log directory" if key == "logdir" else "checkpoint directory"
        if not folder.is_dir():
            continue
        held = [name for name in CHECKPOINT_FILES if os.path.lexists(folder / name)]
        if held and not (resume_dir is not None and _same_folder(folder, resume_dir)):
            raise UsageError(f"the {what} ({option}) {folder} holds another run's checkpoint{'s' * (len(held) > 1)} "
                             f"({', '.join(held)}), which this run would overwrite: resume that run with --resume "
                             f"{folder / held[0]}, or pick another {option} (or move them away)")
    logdir = Path(config["logdir"])
    if resume is None and logdir.is_dir():
        events = glob.glob(os.path.join(glob.escape(str(logdir)), "events.out.tfevents.*"))
        if events or os.path.lexists(logdir / "config.toml"):
            held = "TensorBoard events" if events else "config.toml"
            raise UsageError(f"the log directory (--logdir) {logdir} holds another run's {held}, which this run would "
                             f"mix with its own: pick another --logdir (or resume that run with --resume)")


def remove_stale_temporaries(folder):
    """Remove the temporary files (`.tmp-<pid>-<hex>.<ext>`, `<name>.npz.tmp-<pid>`) in `folder` whose writing
    process no longer runs on this machine; returns [(name, bytes)] of those removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        try:
            os.kill(pid, 0)
            continue  # its writer still runs (or the pid is another live process's): leave it
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(folder, name)
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
        except OSError:
            continue
        removed.append((name, size))
    return removed


def write_atomically(path, write):
    """Call write(f) on a new temporary file next to `path`, fsync it and rename it to `path` (replacing a file or a
    symbolic link there, never writing through one). The temporary file is removed if anything fails."""
    from .checkpoint import new_temporary_file

    path = os.fspath(path)
    fd, tmp = new_temporary_file(os.path.dirname(os.path.abspath(path)), suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------------------------- failing outputs
def _reason(exc):
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


class Outputs:
    """The failures of a run's outputs: `report` prints one line per failure on stderr, `failed` names the outputs
    that failed at least once."""

    def __init__(self):
        self.failed = []

    def report(self, what, exc, consequence):
        if what not in self.failed:
            self.failed.append(what)
        print(f"dpnet-train: error: cannot write {what} ({_reason(exc)}): {consequence}", file=sys.stderr, flush=True)

    def attempt(self, what, consequence, action, *args):
        """action(*args), reporting an OSError instead of raising it; returns True when it succeeded."""
        try:
            action(*args)
        except OSError as exc:
            self.report(what, exc, consequence)
            return False
        return True

    def tensorboard(self, monitor):
        return _GuardedEvents(monitor, self)

    def checkpoints(self, monitor):
        return _GuardedCheckpoints(monitor, self)


class _GuardedEvents:
    """A TensorBoardMonitor whose first failing write ends its events (one message); the run goes on."""

    def __init__(self, monitor, outputs):
        self.monitor, self.outputs, self.broken = monitor, outputs, False

    def _do(self, name, *args):
        if self.broken:
            return
        what = f"the TensorBoard events in {self.monitor.logdir}"
        if not self.outputs.attempt(what, "the run goes on without them", getattr(self.monitor, name), *args):
            self.broken = True
            try:
                self.monitor.close()
            except OSError:
                pass

    def on_train_begin(self, solver):
        self._do("on_train_begin", solver)

    def on_iteration_end(self, solver, info):
        self._do("on_iteration_end", solver, info)

    def on_epoch_end(self, solver, info):
        self._do("on_epoch_end", solver, info)

    def on_train_end(self, solver, info):
        self._do("on_train_end", solver, info)

    def write_hparams(self, *args):
        self._do("write_hparams", *args)

    def flush(self):
        self._do("flush")

    def close(self):
        self._do("close")

    @property
    def purge_step(self):
        return self.monitor.purge_step

    @purge_step.setter
    def purge_step(self, step):
        self.monitor.purge_step = step


class _GuardedCheckpoints:
    """A CheckpointMonitor whose failing write is reported and tried again at the next epoch where one is due; the
    previous checkpoint is kept (they are written atomically). Non-finite parameters still stop the run."""

    def __init__(self, monitor, outputs):
        self.monitor, self.outputs = monitor, outputs
        self.last_path, self.best_path = monitor.last_path, monitor.best_path

    def on_epoch_end(self, solver, info):
        what = f"the checkpoint of epoch {solver.epoch} in {self.monitor.directory}"
        self.outputs.attempt(what, "the previous checkpoint is kept; the next epoch tries again",
                             self.monitor.on_epoch_end, solver, info)


# ----------------------------------------------------------------------------------------------- the beginning, the end
def _network(config, model):
    import numpy as np

    from .config import shown
    from .flip_average import unwrap

    count = sum(int(np.size(value)) for value in model.params.values())
    if config["model"] is not None:
        options = f" {shown(config['model_options'])}" if config["model_options"] else ""
        kind = type(unwrap(model)).__name__
        return f"model {config['model']}{options} ({kind}, {count} parameters, {config['dtype']})"
    if config["layers"] is not None:
        return f"Sequential {shown(config['layers'])} ({count} parameters, {config['dtype']})"
    dims = "-".join(map(str, [model.input_dim, *config["hidden_dims"], model.num_classes]))
    return (f"FullyConnectedNet {dims} ({config['normalization']}, {config['activation']}, dropout keep "
            f"{config['dropout']:g}, {config['dtype']})")


def describe(comm, config, meta, solver):
    """The opening lines of a run (rank 0, unless --quiet): the network, the recipe, the processes, the resume."""
    from .config import shown

    threads = config["blas_threads"]
    optim = f" {shown(config['optim'])}" if config["optim"] else ""
    lines = [f"dpnet-train: {_network(config, solver.model)}; {config['update_rule']} lr {config['lr']:g}{optim} "
             f"decay {config['lr_decay']:g}; {config['epochs']} epochs of {config['num_train']} images in batches of "
             f"{config['batch_size']}; {comm.size} process{'es' * (comm.size > 1)} x {threads} BLAS "
             f"thread{'s' * (threads > 1)}"]
    if comm.size > 1:
        lines.append("dpnet-train: update-rule state sharded over the processes" if solver.shard_optimizer else
                     "dpnet-train: update-rule state replicated on every process"
                     + (f" (the rule {config['update_rule']!r} does not declare itself elementwise)"
                        if config["shard_optimizer"] else ""))
    if solver.mixing is not None:
        kinds = " and ".join(f"{name} alpha {config[key]:g}" for key, name in (("mixup", "MixUp"), ("cutmix", "CutMix"))
                             if config[key] > 0)
        lines.append(f"dpnet-train: {kinds} on {config['mix_probability']:.0%} of the batches"
                     + (f" (CutMix on {config['cutmix_probability']:.0%} of them)" if "and" in kinds else ""))
    if config["zca"]:
        lines.append(f"dpnet-train: the images are ZCA-whitened (--zca {config['zca']:g}) by the matrix of the "
                     "training images, which the checkpoints keep")
    if config["test_flips"]:
        lines.append("dpnet-train: validation and test images are scored as the average of them and their mirrors "
                     "(--test-flips)")
    if solver.ema is not None:
        every = f"every {solver.ema.every} steps" if solver.ema.every > 1 else "every step"
        lines.append(f"dpnet-train: an average of the parameters with decay {solver.ema.decay:g} ({every}) is scored "
                     "beside them; the best of both is kept")
    if meta is not None:
        lines.append(f"dpnet-train: resuming {config['resume']} at epoch {solver.epoch} (iteration "
                     f"{solver.iteration})")
        if meta.get("num_processes", comm.size) != comm.size:
            lines.append(f"dpnet-train: note: the checkpoint was written by {meta['num_processes']} processes; with "
                         f"{comm.size} the run continues, but not bit for bit as it would have")
    lines.append(f"dpnet-train: logs in {config['logdir']}")
    return "\n".join(lines)


def save_plot(path, solver):
    """curves.png, written atomically; raises ImportError without matplotlib, OSError when it cannot be written."""
    from .monitor import save_curves

    return write_atomically(path, lambda f: save_curves(f, solver.loss_history, solver.train_acc_history,
                                                        solver.val_acc_history))


def hyperparameters(config, num_processes):
    """The run's configuration as TensorBoard hyper-parameters (locations left out; lists and tables as text)."""
    from .config import LOCATION_KEYS, shown

    hp = {k: (shown(v) if isinstance(v, (list, dict)) or v is None else v)
          for k, v in config.items() if k not in LOCATION_KEYS}
    hp["processes"] = num_processes
    return hp


def final_report(comm, solver, config, accuracies, tensorboard, outputs, seconds):
    """Rank 0 at the end: the hyper-parameters with the final metrics, curves.png, and the closing lines. accuracies:
    (test accuracy of the best parameters, of the final ones)."""
    test_acc, final_acc = accuracies
    metrics = {"hparam/test_accuracy": float(test_acc), "hparam/final_test_accuracy": float(final_acc),
               "hparam/best_val_accuracy": float(solver.best_val_acc)}
    if solver.loss_history:
        metrics["hparam/final_loss"] = float(solver.loss_history[-1])
    tensorboard.write_hparams(hyperparameters(config, comm.size), metrics, solver.iteration)
    plot = os.path.join(config["logdir"], "curves.png")
    try:
        if not outputs.attempt(f"the plot {plot}", "the run ends without it", save_plot, plot, solver):
            plot = None
    except ImportError:
        plot = None
        print("dpnet-train: no plot: matplotlib is not installed (pip install 'dpnet[plot]' to get curves.png)",
              flush=True)
    minutes, secs = divmod(seconds, 60)
    source = ", the --ema average's" if solver.best_source == "ema" else ""
    flips = "; images averaged with their mirrors" if config["test_flips"] else ""
    print(f"test accuracy {test_acc:.4f} (best validation accuracy {solver.best_val_acc:.4f}{source}; final parameters "
          f"{final_acc:.4f}{flips}; {solver.epoch} epoch{'s' * (solver.epoch != 1)}, {int(minutes)}m{secs:04.1f}s on "
          f"{comm.size} process{'es' * (comm.size > 1)})", flush=True)
    if not config["quiet"]:
        ckdir = config["checkpoint_dir"]
        print(f"logs: {config['logdir']}" + (f"  plot: {plot}" if plot else ""))
        print(f"checkpoints: {os.path.join(ckdir, 'last.npz')} (last state), {os.path.join(ckdir, 'best.npz')} "
              f"(best validation accuracy)")
        print(f"view: tensorboard --logdir {config['logdir']}", flush=True)
