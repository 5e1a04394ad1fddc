"""`python -m dpnet.evaluate CHECKPOINT`: score a trained model on the CIFAR-10 test set (or the run's validation set).

    python -m dpnet.evaluate runs/<run>/best.npz
    python -m dpnet.evaluate runs/<run>/last.npz --which final --split val --json scores.json
    mpiexec -n 2 python -m dpnet.evaluate runs/<run>/best.npz     # each process scores its part; one report

It prints the accuracy, each class's accuracy, the confusion matrix (rows: true class, columns: predicted) and the most
confused pairs, and draws the confusion matrix into `<checkpoint>-confusion-<split>.png` next to the checkpoint (with
matplotlib, the plot extra). The images are preprocessed with the checkpoint's mean image (and whitened by its ZCA
matrix when the run had --zca, by the function and in the chunks training used) and scored 100 at a time in test mode,
each process a contiguous part, exactly as the Solver scores them (each image averaged with its left-right mirror when
the run had --test-flips; `--test-flips` / `--no-test-flips` decide otherwise): the test accuracy of the best parameters
is the one `python -m dpnet.train` printed at its end, to the last digit.

Exit codes: 0 done; 2 bad input (one message, whatever the number of processes); 130 interrupted.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

from .config import NUM_VALIDATION, UsageError
from .model_cli import agree, check_output, command, describe, open_model, parser, write_atomically

PROG = "dpnet-evaluate"
BATCH = 100  # the Solver's check_accuracy batch: the same batches give the same scores
MOST_CONFUSED = 5


def build_parser(rank=0):
    result = parser(PROG, "Score a trained model on the CIFAR-10 test set (or the run's validation set): accuracy,\n"
                          "per-class accuracy, confusion matrix and most confused pairs.", rank)
    result.add_argument("--data-dir", metavar="DIR",
                        help="folder holding cifar-10-batches-py, or that folder itself (default: $DPNET_DATA_DIR, "
                             "else the run's --data-dir, else ~/.cache/dpnet/data)")
    result.add_argument("--split", choices=("test", "val"), default="test",
                        help="the 10000 test images (default), or the run's 1000 validation images")
    result.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    result.add_argument("--no-plot", action="store_true", help="do not draw the confusion matrix PNG")
    return result


# ----------------------------------------------------------------------------------------------- data
def _data_folder(args, config):
    from .data_utils import CIFAR10NotFoundError, DATA_DIR_ENV, find_data_dir

    chosen = args.data_dir or os.environ.get(DATA_DIR_ENV) or config.get("data_dir")
    try:
        return find_data_dir(chosen)
    except CIFAR10NotFoundError as exc:
        where = f"in {chosen}" if chosen else "in the default folder (~/.cache/dpnet/data)"
        missing = f" ({exc.incomplete} is incomplete)" if exc.incomplete is not None else ""
        raise UsageError(f"CIFAR-10 not found {where}{missing}: pass --data-dir, the folder holding "
                         f"cifar-10-batches-py (`python -m dpnet.train --download` downloads it)") from None


def split_images(model, meta, args, quiet=False):
    """(X, y, note): the split's images in the model's dtype, made as the training run made its own (an ImageArray:
    mean subtracted; with the checkpoint's ZCA matrix, the whole split whitened by it as dpnet.train's load_data
    whitens it, dpnet.data.whitening.whiten) and int64 labels; note says when the mean image had to be recomputed
    (checkpoints that do not hold it)."""
    from .data_utils import ImageArray, load_CIFAR10_raw

    config = meta.get("config") or {}
    num_train = config.get("num_train")
    if num_train is None and (args.split == "val" or model.mean_image is None):
        what = "its validation images" if args.split == "val" else "the mean image of its training images"
        raise UsageError(f"checkpoint {args.checkpoint} does not record {what} (only checkpoints of "
                         f"`python -m dpnet.train` do)")
    folder = _data_folder(args, config)
    try:
        X_train, y_train, X_test, y_test = load_CIFAR10_raw(folder)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load CIFAR-10 from {folder}: {exc}") from None
    mean, note = model.mean_image, None
    if mean is None:  # what get_CIFAR10_data computed for the run
        mean = X_train[:num_train].sum(axis=0, dtype=np.int64) / num_train
        note = f"note: the checkpoint holds no mean image; recomputed from its {num_train} training images"
    if args.split == "val":
        rows = slice(num_train, num_train + NUM_VALIDATION)
        raw, labels = X_train[rows], y_train[rows]
    else:
        raw, labels = X_test, y_test
    dtype = np.dtype(next(iter(model.params.values())).dtype)
    X = ImageArray(raw, mean, dtype)
    if getattr(model, "zca", None) is not None:  # (the whole split on every process: the chunks training whitened)
        from .data.whitening import whiten

        X = whiten(X, model.zca, dtype)
    return X, np.asarray(labels, dtype=np.int64), note


# ----------------------------------------------------------------------------------------------- scoring
def confusion_matrix(model, X, y, num_classes, rank=0, size=1):
    """int64 (C, C): [true, predicted] counts of process `rank` of `size`, which scores its contiguous part of the
    rows in batches of BATCH, as Solver.check_accuracy does (sum them over the processes for the whole)."""
    n = len(y)
    mine = np.arange(rank * n // size, (rank + 1) * n // size)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(mine), BATCH):
        rows = mine[start:start + BATCH]
        scores = model.loss(X[rows])
        if scores.ndim != 2 or scores.shape[1] != num_classes:
            raise UsageError(f"the model gives scores of shape {scores.shape}, not (N, {num_classes})")
        np.add.at(counts, (y[rows], np.argmax(scores, axis=1)), 1)
    return counts


def results(counts, names, split, checkpoint, which):
    """The JSON-able summary of a confusion matrix."""
    total, correct = int(counts.sum()), int(np.trace(counts))
    per_class = []
    for i, name in enumerate(names):
        images = int(counts[i].sum())
        per_class.append(dict(name=name, accuracy=int(counts[i, i]) / images if images else None,
                              correct=int(counts[i, i]), images=images))
    off = [(int(counts[t, p]), t, p) for t in range(len(names)) for p in range(len(names)) if t != p and counts[t, p]]
    off.sort(key=lambda item: (-item[0], item[1], item[2]))
    confused = [dict(true=names[t], predicted=names[p], images=c, share_of_true=c / int(counts[t].sum()))
                for c, t, p in off[:MOST_CONFUSED]]
    return dict(checkpoint=str(checkpoint), which=which, split=split, images=total, correct=correct,
                accuracy=correct / max(total, 1), per_class=per_class, classes=list(names),
                confusion=counts.tolist(), most_confused=confused)


def report(summary):
    """The text evaluate prints."""
    names, counts = summary["classes"], np.array(summary["confusion"])
    lines = [f"{summary['split']} accuracy {summary['accuracy']:.4f} ({summary['correct']} of {summary['images']} "
             f"images)", "", f"{'class':<12}{'accuracy':>9}{'correct':>9}{'images':>8}"]
    for row in summary["per_class"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['name']:<12}{accuracy:>9}{row['correct']:>9}{row['images']:>8}")
    width = max(6, len(str(counts.max())) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * 12 + "".join(f"{name[:width - 1]:>{width}}" for name in names)]
    lines += [f"{name:<12}" + "".join(f"{c:>{width}}" for c in row) for name, row in zip(names, counts)]
    if summary["most_confused"]:
        lines += ["", "most confused (true -> predicted: images, share of the true class)"]
        lines += [f"  {c['true']} -> {c['predicted']}: {c['images']} ({c['share_of_true']:.1%})"
                  for c in summary["most_confused"]]
    return "\n".join(lines)


def save_plot(path, summary):
    """Draw the confusion matrix as a PNG at `path` (atomically). Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    names, counts = summary["classes"], np.array(summary["confusion"])
    fig = Figure(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.7 * len(names)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{summary['split']} accuracy {summary['accuracy']:.4f} ({summary['which']} parameters)")
    threshold = counts.max() / 2
    for (t, p), c in np.ndenumerate(counts):
        ax.text(p, t, str(c), ha="center", va="center", fontsize=8, color="white" if c > threshold else "black")
    fig.tight_layout()
    return write_atomically(path, lambda f: fig.savefig(f, format="png"))


def plot_path(checkpoint, split):
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-confusion-{split}.png")


# ----------------------------------------------------------------------------------------------- the command
def run(argv=None):
    from .parallel import get_communicator

    comm = get_communicator()
    args = build_parser(comm.rank).parse_args(argv)

    def prepare():
        if args.json is not None and comm.rank == 0:
            check_output(args.json, "JSON file (--json)")
        model, meta = open_model(args.checkpoint, args.which, args.test_flips)
        if model.class_names is None:
            raise UsageError(f"the model of {args.checkpoint} does not say how many classes it has")
        X, y, note = split_images(model, meta, args)
        return model, meta, X, y, note

    model, meta, X, y, note = agree(comm, prepare, PROG)
    counts = agree(comm, lambda: confusion_matrix(model, X, y, len(model.class_names), comm.rank, comm.size), PROG)
    comm.allreduce(counts)
    if comm.rank != 0:
        return 0
    summary = results(counts, model.class_names, args.split, args.checkpoint, args.which)
    processes = f" on {comm.size} processes" if comm.size > 1 else ""
    print(f"{PROG}: {args.which} parameters of {args.checkpoint} (epoch {meta.get('epoch')}, iteration "
          f"{meta.get('iteration')}): {describe(model, meta)}{processes}", flush=True)
    if note:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    print(report(summary), flush=True)
    if args.json is not None:
        write_atomically(args.json, lambda f: f.write(json.dumps(summary, indent=1).encode() + b"\n"))
        print(f"results: {args.json}")
    if not args.no_plot:
        path = plot_path(args.checkpoint, args.split)
        try:
            print(f"confusion matrix plot: {save_plot(path, summary)}", flush=True)
        except ImportError:
            print(f"{PROG}: no plot: matplotlib is not installed (pip install 'dpnet[plot]')", file=sys.stderr)
        except OSError as exc:
            print(f"{PROG}: no plot: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
    return 0


main = command(PROG, run)

if __name__ == "__main__":
    sys.exit(main())
