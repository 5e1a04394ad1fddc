"""What the commands that use a trained model share (`python -m dpnet.evaluate`, `dpnet.predict`, `dpnet.export`):
their parser, bad input as one message and exit code 2, opening the checkpoint's model, and writing output files
atomically."""

import argparse
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from .config import EXIT_BAD_INPUT, Parser, UsageError, agree  # noqa: F401 (agree: the commands use it from here)

EXIT_INTERRUPTED = 130


def parser(prog, description, rank=0):
    """An argparse parser printing on rank 0 only, with "did you mean" for choices, and the CHECKPOINT, --which and
    --test-flips arguments every command takes."""
    result = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Exit codes: 0 done, 2 bad input (one message), 130 interrupted.")
    result.rank = rank
    result.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint of dpnet (runs/<run>/best.npz, "
                                                                 "last.npz, or any file of dpnet.checkpoint)")
    result.add_argument("--which", choices=("best", "final"), default="best",
                        help="the parameters with the best validation accuracy (default), or the final ones: those "
                             "the run had when the checkpoint was written")
    result.add_argument("--test-flips", action=argparse.BooleanOptionalAction, default=None,
                        help="score each image as the average of the network's scores of it and of its left-right "
                             "mirror, or (--no-test-flips) of it alone (default: as the checkpoint's run did, its "
                             "--test-flips)")
    return result


def command(prog, run):
    """main(argv=None) of a command: run(argv) returns the exit code; UsageError prints `prog: error: message` and
    returns 2, Ctrl-C returns 130."""
    def main(argv=None):
        try:
            return run(argv)
        except UsageError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED

    return main


def open_model(path, which, test_flips=None):
    """(model, meta) of the checkpoint (dpnet.loading.read_model: test_flips None as its run scored images, else
    forced on or off); UsageError saying what is wrong."""
    from .checkpoint import CheckpointError
    from .loading import read_model

    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a folder, not a file (runs/<run>/best.npz, say)")
    try:
        return read_model(path, which, test_flips)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def describe(model, meta):
    """One line naming the model: "FullyConnectedNet 3072-40-30-10 (batchnorm, relu, float32)", "Sequential
    affine:units=40,relu,affine:units=10 (float32)", "model fx_mlp (Sequential, float32)"; with test flips (a
    dpnet.flip_average.FlipAveraged) ", images averaged with their mirrors" after it, and for a model trained on
    whitened images (--zca) ", inputs ZCA-whitened" after that."""
    from .config import format_layers
    from .flip_average import FlipAveraged, unwrap

    flips = ", images averaged with their mirrors" if isinstance(model, FlipAveraged) else ""
    flips += ", inputs ZCA-whitened" if getattr(model, "zca", None) is not None else ""
    record = meta.get("architecture") or {}
    dtype = np.dtype(next(iter(model.params.values())).dtype).name
    if record.get("type") == "FullyConnectedNet":
        dims = "-".join(map(str, [record["input_dim"], *record["hidden_dims"], record["num_classes"]]))
        return f"FullyConnectedNet {dims} ({record['normalization'] or 'no normalization'}, {record['activation']}, " \
               f"{dtype}){flips}"
    if record.get("type") == "Sequential":
        return f"Sequential {format_layers(record['layers'])} ({dtype}){flips}"
    name = (meta.get("config") or {}).get("model")
    return f"{'model ' + name + ' (' if name else '('}{type(unwrap(model)).__name__}, {dtype}){flips}"


def check_output(path, what):
    """UsageError unless a file can be written at `path` (its folder exists and is writable; it is not a folder)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"the {what} {path} is a folder")
    if not folder.is_dir():
        raise UsageError(f"the {what} {path} cannot be written: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"the {what} {path} cannot be written: no write permission on {folder}")


def write_atomically(path, write):
    """write(file object opened "wb") into a temporary file beside `path`, then rename it to `path`: a failure leaves
    any previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)
