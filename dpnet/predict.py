"""`python -m dpnet.predict CHECKPOINT IMAGE...`: the classes a trained model sees in images, with probabilities.

    python -m dpnet.predict runs/<run>/best.npz cat.jpg ship.png --top 3
    python -m dpnet.predict runs/<run>/best.npz images.npy --json predictions.json

An IMAGE is a picture file (PNG, JPEG or any other format Pillow reads, of any size) or a NumPy `.npy` array.
Pictures are turned upright (EXIF orientation), converted to RGB (transparent parts over white) and resized to 32x32
as CIFAR-10's images were made, by averaging the pixels each one covers (Pillow's BOX filter; BICUBIC when a side is
smaller than 32). Reading them needs Pillow, which the plot extra brings (`pip install 'dpnet[plot]'`). An array
holds pixel values 0..255 of one image or of N: (3, 32, 32), (32, 32, 3), (N, 3, 32, 32) or (N, 32, 32, 3), of any
real type; with --preprocessed, what `model.loss` takes instead (the mean image already subtracted, and the result
whitened for a checkpoint of a --zca run). Every image is preprocessed as the training images were, with the mean
image saved in the checkpoint and, when the run had --zca, its ZCA matrix (dpnet.loading.preprocess); the
probabilities are the
softmax of the model's scores: with test flips (the run's --test-flips, or `--test-flips` here), of the average of the
image's scores and its left-right mirror's. One line per image: its name, then the top classes with their
probabilities.

Exit codes: 0 done; 2 bad input (a missing or unreadable file, an array of another shape: one message); 130
interrupted.
"""

import json
import sys
from pathlib import Path

import numpy as np

from .config import UsageError
from .loading import class_names
from .model_cli import check_output, command, open_model, parser, write_atomically

PROG = "dpnet-predict"
IMAGE_SHAPE = (3, 32, 32)
BATCH = 100


def build_parser():
    result = parser(PROG, "Classify images with a trained model: PNG/JPEG files of any size (resized to 32x32)\n"
                          "or .npy arrays of images; prints the top classes and their probabilities.")
    result.add_argument("images", nargs="+", metavar="IMAGE", help="a picture file (PNG, JPEG, ...) or a .npy "
                                                                   "array of images")
    result.add_argument("--top", type=int, default=3, metavar="K", help="how many classes to print per image "
                                                                        "(default: 3)")
    result.add_argument("--preprocessed", action="store_true",
                        help=".npy arrays hold what model.loss takes (the mean image subtracted, then whitened for "
                             "a checkpoint of a --zca run), not pixel values")
    result.add_argument("--json", metavar="FILE", help="also write every class's probability to FILE as JSON")
    return result


# ----------------------------------------------------------------------------------------------- reading images
def read_picture(path):
    """uint8 (3, 32, 32) of a picture file: upright, RGB (transparency over white), resized to 32x32 (BOX filter,
    or BICUBIC when a side is smaller). UsageError when Pillow is missing or the file is not a picture."""
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise UsageError(f"reading the picture {path} needs Pillow, which the plot extra brings: pip install "
                         f"'dpnet[plot]' (or give the images as a .npy array)") from None
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        # (SyntaxError: some broken headers; DecompressionBombError: a picture of more than 179 million pixels)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"cannot read the image {path}: {detail}") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    size = (IMAGE_SHAPE[2], IMAGE_SHAPE[1])  # (width, height)
    if image.size != size:
        small = image.size[0] < size[0] or image.size[1] < size[1]
        image = image.resize(size, Image.Resampling.BICUBIC if small else Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def read_array(path, preprocessed):
    """(images (N, 3, 32, 32), whether the file held one image (3 dimensions)) of a .npy file, read without pickle:
    pixel values, or with `preprocessed` what the model takes. UsageError for any other content."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"cannot read the array {path}: not a NumPy .npy file of numbers ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "uif":
        kind = array.dtype if isinstance(array, np.ndarray) else "an archive of several arrays"
        raise UsageError(f"the array {path} holds {kind}, not image values")
    single = array.ndim == 3
    if single:
        array = array[None]
    if array.ndim == 4 and array.shape[1:] == IMAGE_SHAPE[1:] + IMAGE_SHAPE[:1]:
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE or len(array) == 0:
        raise UsageError(f"the array {path} has shape {array.shape}: expected images (N, 3, 32, 32) or (N, 32, 32, "
                         f"3), or one image (3, 32, 32) or (32, 32, 3)")
    if not np.isfinite(array).all():
        raise UsageError(f"the array {path} holds NaN or inf")
    if not preprocessed and (array.min() < 0 or array.max() > 255):
        raise UsageError(f"the array {path} holds values from {array.min():g} to {array.max():g}: pixel values 0..255 "
                         f"expected (pass --preprocessed if the mean image is already subtracted)")
    return array, single


def read_inputs(paths, preprocessed):
    """[(name, (3, 32, 32) image, whether it is preprocessed)] of the files, in order."""
    inputs = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"no such file: {path}" if not file.exists() else f"{path} is not a file")
        if file.suffix.lower() == ".npy":
            images, single = read_array(path, preprocessed)
            names = [path] if single else [f"{path}[{i}]" for i in range(len(images))]
            inputs += [(name, image, preprocessed) for name, image in zip(names, images)]
        else:
            inputs.append((path, read_picture(path), False))
    return inputs


# ----------------------------------------------------------------------------------------------- predicting
def probabilities(model, X):
    """float64 (N, C): the softmax of the model's scores for the preprocessed images X, BATCH at a time."""
    scores = np.concatenate([model.loss(X[i:i + BATCH]) for i in range(0, len(X), BATCH)]).astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return exp / exp.sum(axis=1, keepdims=True)


def model_inputs(model, inputs, checkpoint):
    """The (N, 3, 32, 32) array model.loss takes: pixels preprocessed with the checkpoint's mean image (and ZCA
    matrix: dpnet.loading.preprocess, which gives each image the bits it has among the test set in training, however
    many images it is whitened with)."""
    from .loading import preprocess

    dtype = np.dtype(next(iter(model.params.values())).dtype)
    if getattr(model, "input_dim", 3072) != int(np.prod(IMAGE_SHAPE)):
        raise UsageError(f"the model of {checkpoint} takes inputs of {model.input_dim} values, not 32x32 RGB images")
    pixels = [i for i, (_, _, pre) in enumerate(inputs) if not pre]
    if pixels and model.mean_image is None:
        raise UsageError(f"checkpoint {checkpoint} holds no mean image (it was written from images that did not "
                         f"carry one), so pixels cannot be preprocessed as in training; give .npy arrays already "
                         f"preprocessed, with --preprocessed")
    X = np.empty((len(inputs), *IMAGE_SHAPE), dtype=dtype)
    for i, (_, image, pre) in enumerate(inputs):
        if pre:
            X[i] = image
    if pixels:
        X[pixels] = preprocess(model, np.stack([inputs[i][1] for i in pixels]))
    return X


def run(argv=None):
    args = build_parser().parse_args(argv)
    if args.top < 1:
        raise UsageError(f"--top must be a positive number of classes, got {args.top}")
    if args.json is not None:
        check_output(args.json, "JSON file (--json)")
    model, _ = open_model(args.checkpoint, args.which, args.test_flips)
    inputs = read_inputs(args.images, args.preprocessed)
    probs = probabilities(model, model_inputs(model, inputs, args.checkpoint))
    names = model.class_names or class_names(probs.shape[1])
    if args.top > len(names):
        raise UsageError(f"--top {args.top} is more than the model's {len(names)} classes")
    predictions = []
    for (name, _, _), p in zip(inputs, probs):
        top = np.argsort(-p, kind="stable")[:args.top]
        print(f"{name}: " + ", ".join(f"{names[k]} {p[k]:.4f}" for k in top), flush=True)
        predictions.append(dict(input=name, top=[dict(name=names[k], index=int(k), probability=float(p[k]))
                                                  for k in top],
                                probabilities=dict(zip(names, map(float, p)))))
    if args.json is not None:
        document = dict(checkpoint=args.checkpoint, which=args.which, classes=list(names), predictions=predictions)
        write_atomically(args.json, lambda f: f.write(json.dumps(document, indent=1).encode() + b"\n"))
    return 0


main = command(PROG, run)

if __name__ == "__main__":
    sys.exit(main())
