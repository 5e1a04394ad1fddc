"""Monitors: what a person, TensorBoard and the checkpoint folder see of a training run.

A monitor is any object with some of the methods `on_train_begin(solver)`, `on_iteration_end(solver, info)`,
`on_epoch_end(solver, info)` and `on_train_end(solver, info)`; the Solver calls them on rank 0 only (the info dicts
are described in dpnet.solver). `Monitor` is a base class with no-op methods.

- `TensorBoardMonitor`: event files for TensorBoard, written through tensorboardX (imported lazily).
- `ProgressMonitor`: a tqdm bar per epoch (only on a terminal) and one summary line per epoch.
- `CheckpointMonitor`: `last.npz` every few epochs and at the last one, `best.npz` when validation accuracy improves.
- `save_curves`: the seed's two plots (loss; train/val accuracy) as a PNG (needs matplotlib: `pip install dpnet[plot]`).
- `read_events`, `read_scalars`: read event files back without TensorBoard (what the tests use).

Nothing here imports tensorboardX or matplotlib until it is used.
"""

import glob
import itertools
import logging
import math
import os
import struct
import sys
import time

import numpy as np

from .checkpoint import save_checkpoint

HISTOGRAM_BINS = 64
_writers = itertools.count()


class Monitor:
    """A monitor that does nothing; subclass it and override the events you need."""

    def on_train_begin(self, solver):
        pass

    def on_iteration_end(self, solver, info):
        pass

    def on_epoch_end(self, solver, info):
        pass

    def on_train_end(self, solver, info):
        pass


# ----------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardMonitor(Monitor):
    """Writes a run's TensorBoard event file in `logdir` (steps are the Solver's 1-based iteration counter).

    - every `log_every` iterations (and the first): scalars `train/loss`, `train/learning_rate`, `train/grad_norm`,
      `train/samples_per_sec` of that iteration (the gradient norm, a pass over every gradient, is computed only then)
    - every epoch: scalars `accuracy/train`, `accuracy/val` (and `accuracy/val_average`, the average's, with
      ema_decay); histograms `weights/<param>` and `gradients/<param>`
      (the gradient of the epoch's last minibatch) of every parameter; then the file is flushed
    - at the start: the configuration as text (tag `config`), when `config_text` is given
    - `write_hparams(hparams, metrics)`: the run's hyper-parameters with its final metrics (TensorBoard's HPARAMS tab)

    Events are written synchronously, so everything up to the last epoch end is on disk when the process dies.
    `purge_step` (a resumed run: its first iteration) tells TensorBoard to drop what a killed run wrote from that
    step on. Gradient histograms use `info['grads']` of the epoch's last iteration.
    """

    def __init__(self, logdir, config_text=None, purge_step=None, log_every=10):
        if int(log_every) != log_every or log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
        self.log_every = int(log_every)
        self.logdir = os.fspath(logdir)
        self.config_text = config_text
        self.purge_step = purge_step
        self._writer = None
        self._grads = None

    def _open(self):
        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            os.makedirs(self.logdir, exist_ok=True)
            # Unique even for two writers started in the same second by one process (the name has only seconds).
            self._writer = EventsWriter(os.path.join(self.logdir, "events"), f".{os.getpid()}.{next(_writers)}")
            if self.purge_step is not None:
                self._writer.write_event(Event(wall_time=time.time(), step=self.purge_step,
                                               session_log=SessionLog(status=SessionLog.START)))
        return self._writer

    def _write(self, summary, step):
        from tensorboardX.proto.event_pb2 import Event

        self._open().write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag, value, step):
        from tensorboardX.summary import scalar

        # A non-finite value (a diverging run's last loss or gradient norm) is written as it is; tensorboardX would
        # also log a warning to stderr, but the run reports the divergence itself, in one message.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        self._write(scalar(tag, float(value)), step)

    def histogram(self, tag, values, step):
        from tensorboardX.summary import histogram

        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size and np.isfinite(values).all():
            self._write(histogram(tag, values, HISTOGRAM_BINS), step)

    def text(self, tag, text, step=0):
        from tensorboardX.summary import text as text_summary

        self._write(text_summary(tag, text), step)

    def write_hparams(self, hparams, metrics, step):
        """Record hyper-parameters (name -> bool/int/float/str) with final metrics (tag -> float) in this run."""
        from tensorboardX.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):
            self._write(summary, step)
        for tag, value in metrics.items():
            self.scalar(tag, value, step)
        self.flush()

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # Solver events
    def on_train_begin(self, solver):
        self._open()
        if self.config_text:
            self.text("config", self.config_text, solver.iteration)
        self.flush()

    def on_iteration_end(self, solver, info):
        step = info["iteration"]
        self._grads = info["grads"]
        if step % self.log_every and step != 1:
            return
        self.scalar("train/loss", info["loss"], step)
        self.scalar("train/learning_rate", info["learning_rate"], step)
        self.scalar("train/grad_norm", info["grad_norm"], step)
        self.scalar("train/samples_per_sec", info["samples_per_sec"], step)

    def on_epoch_end(self, solver, info):
        step = info["iteration"]
        self.scalar("accuracy/train", info["train_acc"], step)
        self.scalar("accuracy/val", info["val_acc"], step)
        if "ema_val_acc" in info:
            self.scalar("accuracy/val_average", info["ema_val_acc"], step)
        for name, value in solver.model.params.items():
            self.histogram(f"weights/{name}", value, step)
        for name, value in (self._grads or {}).items():
            self.histogram(f"gradients/{name}", value, step)
        self.flush()

    def on_train_end(self, solver, info):
        self.flush()


# ----------------------------------------------------------------------------------------------- progress
class ProgressMonitor(Monitor):
    """A progress bar per epoch with loss and throughput (tqdm, on stderr, only when it is a terminal) and one
    summary line per epoch on `stream` (default stdout). `quiet` turns both off."""

    def __init__(self, quiet=False, stream=None, bar=None):
        self.quiet = quiet
        self.stream = stream
        self.bar_enabled = (not quiet and sys.stderr.isatty()) if bar is None else bar
        self._bar = None
        self._losses, self._start, self._samples = [], None, 0

    def _print(self, text):
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, solver):
        self._start, self._samples = time.perf_counter(), 0

    def on_iteration_end(self, solver, info):
        self._losses.append(info["loss"])
        self._samples += info["batch_size"]
        if self.bar_enabled:
            if self._bar is None:
                from tqdm import tqdm

                done = (info["iteration"] - 1) % solver.iterations_per_epoch
                self._bar = tqdm(total=solver.iterations_per_epoch, initial=done, leave=False, unit="it",
                                 desc=f"epoch {info['epoch'] + 1}/{solver.num_epochs}", dynamic_ncols=True)
            rate = self._samples / max(time.perf_counter() - self._start, 1e-9)  # this epoch's, steadier than a step's
            self._bar.set_postfix_str(f"loss {info['loss']:.4f}, {rate:.0f} samples/s", refresh=False)
            self._bar.update(1)

    def on_epoch_end(self, solver, info):
        """Prints the epoch's mean loss, accuracies, learning rate and wall time (epoch times add up to the run's)."""
        seconds = time.perf_counter() - self._start
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.quiet:
            loss = float(np.mean(self._losses)) if self._losses else float("nan")
            average = f", average's val acc {info['ema_val_acc']:.4f}" if "ema_val_acc" in info else ""
            self._print(f"epoch {info['epoch']}/{solver.num_epochs}: loss {loss:.4f}, train acc "
                        f"{info['train_acc']:.4f}, val acc {info['val_acc']:.4f}{average}, "
                        f"lr {info['learning_rate']:.3g}, {seconds:.3g} s ({self._samples / seconds:.0f} samples/s)")
        self._losses, self._start, self._samples = [], time.perf_counter(), 0

    def on_train_end(self, solver, info):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------------------------- checkpoints
class CheckpointMonitor(Monitor):
    """Writes `<directory>/last.npz` (the whole Solver state, see dpnet.checkpoint) every `every` epochs and at the
    last epoch (every=0: only at the last one), and `<directory>/best.npz` at each epoch end whose parameters are the
    best so far by validation accuracy. Both are written atomically; `config` (a JSON-able dict) is stored in them.

    The last epoch's `last.npz` is written before the Solver puts the best parameters back into the model, so it
    holds the run's last state (and resuming from it continues exactly); its `best/` arrays are the parameters the
    Solver ends with. Parameters that are not finite are never written: the previous checkpoint stays intact.
    """

    LAST, BEST = "last.npz", "best.npz"

    def __init__(self, directory, every=1, config=None):
        self.directory = os.fspath(directory)
        self.every = int(every)
        self.config = config
        self.last_path = os.path.join(self.directory, self.LAST)
        self.best_path = os.path.join(self.directory, self.BEST)

    def on_epoch_end(self, solver, info):
        params = solver.model.params
        is_last = solver.epoch >= solver.num_epochs
        due = is_last or (self.every > 0 and solver.epoch % self.every == 0)
        held = params  # the parameters this epoch's evaluation scored: the live ones, or the average (ema_decay)
        if getattr(solver, "best_source", None) == "ema":
            held = {name: solver.ema.arrays[f"param/{name}"] for name in params}
        is_best = bool(solver.best_params) and all(np.array_equal(solver.best_params[k], v) for k, v in held.items())
        if not (due or is_best):
            return
        bad = [name for name, value in params.items() if not np.isfinite(value).all()]
        if bad:
            raise FloatingPointError(f"parameters {', '.join(bad)} are not finite at iteration {solver.iteration}: "
                                     "not writing a checkpoint (the previous one is kept)")
        if due:
            save_checkpoint(self.last_path, solver, self.config)
        if is_best and not (due and _link_atomic(self.last_path, self.best_path)):
            save_checkpoint(self.best_path, solver, self.config)


def _link_atomic(source, target):
    """Make `target` a hard link to `source` through a temporary name and a rename; False where links fail.

    A later atomic save of `source` replaces its directory entry, not the shared file, so `target` is unaffected.
    """
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


# ----------------------------------------------------------------------------------------------- plots
def save_curves(path, loss_history, train_acc_history, val_acc_history):
    """Write the seed's two plots as a PNG: the training loss per iteration, and train/val accuracy per epoch
    (the first point is the evaluation after the first iteration). Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(15, 12))
    ax = fig.add_subplot(2, 1, 1)
    ax.set_title("Training loss")
    ax.plot(loss_history, "o", markersize=2)
    ax.set_xlabel("Iteration")
    ax = fig.add_subplot(2, 1, 2)
    ax.set_title("Accuracy")
    ax.plot(train_acc_history, "-o", label="train")
    ax.plot(val_acc_history, "-o", label="val")
    ax.plot([0.5] * len(val_acc_history), "k--")
    ax.set_xlabel("Epoch")
    ax.legend(loc="lower right")
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------- reading back
def _records(path):
    """The payloads of a TFRecord file (length u64, crc u32, data, crc u32); a truncated tail is ignored."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_events(logdir):
    """The Event protos of every event file directly in `logdir`, oldest file first, as TensorBoard would show them:
    a SessionLog START at step s (a resumed run) drops the earlier events with step >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    def order(path):
        name = os.path.basename(path)
        stamp = name.split(".out.tfevents.", 1)[1].split(".", 1)[0]
        return int(stamp) if stamp.isdigit() else math.inf, os.path.getmtime(path), name

    events = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(logdir)), "events.out.tfevents.*")), key=order):
        for record in _records(path):
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                events = [e for e in events if e.step < event.step or not e.HasField("summary")]
            events.append(event)
    return events


def read_scalars(logdir):
    """{tag: [(step, value), ...]} of the scalars in `logdir`'s event files (see read_events)."""
    scalars = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
