"""MixUp, CutMix and the average of the parameters under data parallelism: `mpiexec -n N python solver_mixing.py
OUT.npz` trains every configuration of CASES with the Solver on the MPI world; rank 0 writes the results to OUT.npz.
tests/test_mixing.py imports this file and calls `run(case, SerialCommunicator())` for the one-process reference.

Every run: float64, no dropout, crops (padding 1) and flips, the same seed and global batch (50: uneven shards over
3 processes; one case 49, uneven over 2 too), 400 images of shape (3, 8, 8) in 5 classes, 2 epochs of 8 steps.
"""

import sys

import numpy as np
from blob_images import make_blob_images

from dpnet.augment import Augmentation
from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.mixing import Mixing
from dpnet.solver import Solver

SHAPE, CLASSES, NUM_TRAIN, NUM_VAL, BATCH, EPOCHS = (3, 8, 8), 5, 400, 60, 50, 2
BOTH = Mixing(mixup=0.4, cutmix=1.0, probability=0.8, cutmix_probability=0.5)

# name -> options: normalization, rule, mixing, batch, lazy (uint8 ImageArray inputs), ema (decay), ema_every,
# shard (shard_optimizer), sync_batchnorm, sequential, label_smoothing
CASES = {
    "mixup": dict(normalization="batchnorm", rule="sgd_momentum", mixing=Mixing(mixup=0.4)),
    "cutmix": dict(normalization="batchnorm", rule="adam", mixing=Mixing(cutmix=1.0)),
    "both": dict(normalization="layernorm", rule="sgd_momentum", mixing=BOTH, label_smoothing=0.1),
    "uneven-both": dict(normalization="batchnorm", rule="sgd_momentum", mixing=BOTH, batch=49),
    "lazy-both": dict(normalization="batchnorm", rule="adam", mixing=BOTH, lazy=True),
    "sequential-both": dict(normalization="batchnorm", rule="adam", mixing=BOTH, sequential=True),
    "ema": dict(normalization="batchnorm", rule="adam", ema=0.8),
    "sharded-ema-every-both": dict(normalization="batchnorm", rule="adam", mixing=BOTH, ema=0.7, ema_every=3,
                                   shard=True),
    # each process's own batch statistics: not the one-process run, but the replicas and their averages stay
    # identical (the Solver checks them at every epoch end, the average included)
    "nosync-ema-both": dict(normalization="batchnorm", rule="adam", mixing=BOTH, ema=0.8, sync_batchnorm=False),
}
OPTIM_CONFIGS = {"sgd_momentum": {"learning_rate": 0.1}, "adam": {"learning_rate": 1e-2, "epsilon": 1e-6}}


def make_data(lazy=False):
    return make_blob_images(11, 50, SHAPE, CLASSES, (NUM_TRAIN, NUM_VAL), lazy)


class _Last:
    """The parameters after the last step and the last gradient the monitors were given."""

    def on_iteration_end(self, solver, info):
        if info["grads"] is not None:
            self.grads = {name: value.copy() for name, value in info["grads"].items()}

    def on_epoch_end(self, solver, info):
        self.params = {name: value.copy() for name, value in solver.model.params.items()}


def _model(options):
    if options.get("sequential"):
        from dpnet.models import Sequential

        layers = []
        for units in (24, 16):
            layers += [{"layer": "affine", "units": units, "weight_scale": 0.05}, options["normalization"], "relu"]
        layers.append({"layer": "affine", "units": CLASSES, "weight_scale": 0.05})
        return Sequential(layers, input_dim=SHAPE, reg=1e-3, dtype=np.float64, seed=0,
                          label_smoothing=options.get("label_smoothing", 0.0))
    return FullyConnectedNet([24, 16], input_dim=int(np.prod(SHAPE)), num_classes=CLASSES,
                             normalization=options["normalization"], reg=1e-3, weight_scale=0.05, dtype=np.float64,
                             seed=0, label_smoothing=options.get("label_smoothing", 0.0))


def run(case, comm):
    """Train one case on `comm`; returns a dict of arrays (the same on every rank; written by rank 0)."""
    options = CASES[case]
    data = make_data(options.get("lazy", False))
    model = _model(options)
    last = _Last()
    solver = Solver(model, data, update_rule=options["rule"], optim_config=OPTIM_CONFIGS[options["rule"]],
                    lr_decay=0.9, batch_size=options.get("batch", BATCH), num_epochs=EPOCHS, num_train_samples=100,
                    seed=5, comm=comm, verbose=False, monitors=[last], augment=Augmentation(crop_padding=1),
                    mixing=options.get("mixing"), ema_decay=options.get("ema"), ema_every=options.get("ema_every", 1),
                    shard_optimizer=options.get("shard", False), sync_batchnorm=options.get("sync_batchnorm", True))
    solver.train()
    out = {f"last/{name}": value for name, value in getattr(last, "params", {}).items()}
    out.update({f"grads/{name}": value for name, value in getattr(last, "grads", {}).items()})
    out.update({f"best/{name}": value for name, value in model.params.items()})
    if solver.ema is not None:
        out.update({f"ema/{key}": value for key, value in solver.ema.arrays.items()})
        out["ema_val_acc_history"] = np.array(solver.ema_val_acc_history)
    out["best_source"] = np.array(str(solver.best_source))
    out["loss_history"] = np.array(solver.loss_history)
    out["val_acc_history"] = np.array(solver.val_acc_history)
    out["train_acc_history"] = np.array(solver.train_acc_history)
    return out


def main(path):
    from dpnet.distributed import get_communicator

    comm = get_communicator()
    assert comm.size > 1, "run me under mpiexec -n N with N > 1"
    results = {}
    for case in CASES:
        results.update({f"{case}:{key}": value for key, value in run(case, comm).items()})
    if comm.rank == 0:
        np.savez(path, size=comm.size, **results)


if __name__ == "__main__":
    main(sys.argv[1])
