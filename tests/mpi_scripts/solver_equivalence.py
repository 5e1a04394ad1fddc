"""Data-parallel equivalence: `mpiexec -n N python solver_equivalence.py OUT.npz` trains every configuration of CASES
with the Solver on the MPI world; rank 0 writes the results to OUT.npz. tests/test_solver_mpi.py imports this file and
calls `run(case, SerialCommunicator())` for the one-process reference, so both sides share one definition.

Every run: float64, no dropout, the same seed and global batch (50: uneven shards over 3 or 4 processes; one case 49,
uneven over 2 too), 500 samples
of shape (3, 4, 4) in 5 classes, 2 epochs of 10 steps (lr decay, L2 regularization, sampled train accuracy).
"""

import sys

import numpy as np
from blob_images import make_blob_images

from dpnet.classifiers.fc_net import FullyConnectedNet
from dpnet.parallel import check_in_sync, is_mapped
from dpnet.solver import Solver

SHAPE, CLASSES, NUM_TRAIN, NUM_VAL, BATCH, EPOCHS = (3, 4, 4), 5, 500, 70, 50, 2

# name -> options: normalization, update rule, sync_batchnorm, lazy (uint8 ImageArray inputs), shard (shard_optimizer),
# weight_decay
CASES = {
    f"{norm or 'plain'}-{rule}": dict(normalization=norm, rule=rule)
    for norm in (None, "batchnorm", "layernorm") for rule in ("sgd_momentum", "adam")
}
CASES["batchnorm-nosync-adam"] = dict(normalization="batchnorm", rule="adam", sync_batchnorm=False)
CASES["lazy-batchnorm-sgd_momentum"] = dict(normalization="batchnorm", rule="sgd_momentum", lazy=True)
# The optimizer state sharded over the processes (shard_optimizer; one process has nothing to shard).
CASES["sharded-plain-sgd_momentum"] = dict(normalization=None, rule="sgd_momentum", shard=True)
CASES["sharded-batchnorm-adam"] = dict(normalization="batchnorm", rule="adam", shard=True)
CASES["sharded-layernorm-adam-decay"] = dict(normalization="layernorm", rule="adam", shard=True, weight_decay=0.5)
# A model whose loss returns its own gradient arrays (no `grads` keyword): they are copied into the exchange's buffer.
CASES["sharded-own-arrays-batchnorm-adam"] = dict(normalization="batchnorm", rule="adam", shard=True, own_arrays=True)
# A global batch of 49: uneven shards with 2 processes too (25 + 24), not only with 3 and 4.
CASES["uneven-batchnorm-sgd_momentum"] = dict(normalization="batchnorm", rule="sgd_momentum", batch=49)
# The processes run on one machine: the gradients are summed in shared memory (and the sharded cases share one
# parameter vector), but for these two, which take MPI's collectives (Allreduce; reduce-scatter and allgather).
CASES["unshared-layernorm-adam"] = dict(normalization="layernorm", rule="adam", shared_memory=False)
CASES["sharded-unshared-batchnorm-sgd_momentum"] = dict(normalization="batchnorm", rule="sgd_momentum", shard=True,
                                                        shared_memory=False)
# The same networks spelled as dpnet.models.Sequential (its layers' state dicts; batchnorm's statistics use the
# reducer).
CASES["sequential-batchnorm-adam"] = dict(normalization="batchnorm", rule="adam", sequential=True)
CASES["sharded-sequential-layernorm-sgd_momentum"] = dict(normalization="layernorm", rule="sgd_momentum", shard=True,
                                                          sequential=True)
# Adam's epsilon is raised from 1e-8 so that it does not blow the rounding noise of zero-gradient parameters (the biases
# feeding batchnorm) up to 1e-11-sized values that then shift the running means by 1e-10 relative in every run.
OPTIM_CONFIGS = {"sgd_momentum": {"learning_rate": 0.05}, "adam": {"learning_rate": 2e-3, "epsilon": 1e-6}}


def make_data(lazy=False):
    return make_blob_images(7, 40, SHAPE, CLASSES, (NUM_TRAIN, NUM_VAL), lazy)


class _LastParams:
    """A monitor keeping the parameters and the update rule's state after the last step (train() then restores the
    best parameters), and the last gradient and gradient norm the monitors were given."""

    def on_iteration_end(self, solver, info):
        if info["grads"] is not None:  # with shard_optimizer: only at the last iteration of an epoch
            self.grads = {name: value.copy() for name, value in info["grads"].items()}
        self.grad_norm = info["grad_norm"]

    def on_epoch_end(self, solver, info):
        self.shared = solver.exchange.shared_memory
        self.params = {name: value.copy() for name, value in solver.model.params.items()}
        self.state = {f"{name}/{key}": value.copy() for name, config in solver.optimizer_state().items()
                      for key, value in config.items() if isinstance(value, np.ndarray)}


class _OwnArraysNet(FullyConnectedNet):
    """A model whose loss does not take `grads`: it returns gradient arrays of its own."""

    def loss(self, X, y=None):
        return super().loss(X, y)


# Sequential's parameter names, as FullyConnectedNet's: the two spellings compute the same network.
_FC_NAMES = {f"{layer}{i}.{p}": f"{fc}{i}" for i in (1, 2, 3) for layer, p, fc in
             (("affine", "W", "W"), ("affine", "b", "b"), ("batchnorm", "gamma", "gamma"),
              ("batchnorm", "beta", "beta"), ("layernorm", "gamma", "gamma"), ("layernorm", "beta", "beta"))}


def _sequential(normalization):
    """FullyConnectedNet([20, 15], normalization=...) of run(), spelled as a Sequential."""
    from dpnet.models import Sequential

    layers = []
    for units in (20, 15):
        layers += [{"layer": "affine", "units": units, "weight_scale": 0.05}, normalization, "relu"]
    layers.append({"layer": "affine", "units": CLASSES, "weight_scale": 0.05})
    return Sequential([entry for entry in layers if entry], input_dim=SHAPE, reg=1e-3, dtype=np.float64, seed=0)


def run(case, comm):
    """Train one case on `comm`; returns a dict of arrays (meaningful on every rank; written by rank 0)."""
    options = CASES[case]
    data = make_data(options.get("lazy", False))
    if options.get("sequential"):
        model = _sequential(options["normalization"])
    else:
        model_class = _OwnArraysNet if options.get("own_arrays") else FullyConnectedNet
        model = model_class([20, 15], input_dim=int(np.prod(SHAPE)), num_classes=CLASSES,
                            normalization=options["normalization"], reg=1e-3, weight_scale=0.05, dtype=np.float64,
                            seed=0)
    last = _LastParams()
    solver = Solver(model, data, update_rule=options["rule"],
                    optim_config=OPTIM_CONFIGS[options["rule"]], lr_decay=0.9,
                    batch_size=options.get("batch", BATCH), num_epochs=EPOCHS, num_train_samples=120, seed=3,
                    comm=comm, verbose=False,
                    monitors=[last], sync_batchnorm=options.get("sync_batchnorm", True),
                    shard_optimizer=options.get("shard", False), weight_decay=options.get("weight_decay", 0.0),
                    shared_memory=options.get("shared_memory", True))
    solver.train()
    rename = _FC_NAMES if options.get("sequential") else {}
    out = {f"last/{rename.get(name, name)}": value for name, value in getattr(last, "params", {}).items()}
    for key, value in getattr(last, "state", {}).items():
        name, rest = key.split("/", 1)
        out[f"state/{rename.get(name, name)}/{rest}"] = value
    out.update({f"grads/{rename.get(name, name)}": value for name, value in getattr(last, "grads", {}).items()})
    out["grad_norm"] = np.array(getattr(last, "grad_norm", np.nan))
    out.update({f"best/{rename.get(name, name)}": value for name, value in model.params.items()})
    norm_states = [param for param in model.bn_params if "running_mean" in param or not rename]
    for i, param in enumerate(norm_states):
        out.update({f"norm{i}/{key}": param[key] for key in ("running_mean", "running_var") if key in param})
    out["scores"] = model.loss(data["X_val"][:25])  # test mode, the best parameters
    out["sharded"] = np.array(solver.exchange.sharded)
    # train() hands back arrays of the process's own (the shared memory is freed). Rank 0 keeps the last ones as
    # final_params; use_params("final") broadcasts them (checked identical everywhere), then "best" comes back.
    kept = all(np.array_equal(solver.final_params[name], value) for name, value in getattr(last, "params", {}).items())
    solver.use_params("final")
    check_in_sync(comm, [model.params[name] for name in sorted(model.params)], "after use_params('final')")
    loaded = all(np.array_equal(model.params[name], value) for name, value in getattr(last, "params", {}).items())
    alone = comm.size == 1 or (comm.rank == 0) == bool(solver.final_params)  # rank 0 alone keeps them
    out["final_is_last"] = np.array(kept and loaded and alone)
    best_norm = [{k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)} for p in model.bn_params]
    solver.use_params("best")
    # use_params brings back rank 0's normalization state too, on every rank: wipe it, then load the best again
    for param in model.bn_params:
        for key in [k for k, v in param.items() if isinstance(v, np.ndarray)]:
            param[key] = np.full_like(param[key], np.nan)
    solver.use_params("best")
    restored = [{k: v for k, v in p.items() if isinstance(v, np.ndarray)} for p in model.bn_params]
    norm_ok = all(np.isfinite(v).all() for p in restored for v in p.values())
    out["use_params_restores_norm"] = np.array(norm_ok and all(
        p.keys() == q.keys() and all(np.array_equal(p[k], q[k]) for k in p) for p, q in zip(restored, best_norm)))
    out["shared_memory"] = np.array(getattr(last, "shared", False))
    # On one machine the model that train() hands back is one copy in memory, mapped copy-on-write by every process,
    # and so are rank 0's kept best parameters (dpnet.parallel.bcast_copy_on_write).
    mapped = all(is_mapped(value) for value in model.params.values())
    out["ranks_mapping_the_model"] = comm.allreduce(np.array([mapped], dtype=np.int64))
    mapped = len(solver.best_params) > 0 and all(is_mapped(value) for value in solver.best_params.values())
    out["ranks_mapping_best"] = comm.allreduce(np.array([mapped], dtype=np.int64))
    holding = np.array([len(solver.best_params) > 0], dtype=np.int64)
    out["ranks_holding_best"] = comm.allreduce(holding)
    out["local_state_size"] = np.array(sum(value.size for config in solver.optim_configs.values()
                                           for value in config.values() if isinstance(value, np.ndarray)))
    out["loss_history"] = np.array(solver.loss_history)
    out["train_acc_history"] = np.array(solver.train_acc_history)
    out["val_acc_history"] = np.array(solver.val_acc_history)
    out["check_accuracy"] = np.array([  # sharded evaluation: all samples, a sample of 37 in batches of 8
        solver.check_accuracy(data["X_val"], data["y_val"]),
        solver.check_accuracy(data["X_val"], data["y_val"], num_samples=37, batch_size=8),
        solver.check_accuracy(data["X_train"], data["y_train"], num_samples=333, batch_size=64)])
    return out


def main(path):
    from dpnet.distributed import get_communicator

    comm = get_communicator()
    assert comm.size > 1, "run me under mpiexec -n N with N > 1"
    results = {}
    for case in CASES:
        out = run(case, comm)
        results.update({f"{case}:{key}": value for key, value in out.items()})
    if comm.rank == 0:
        np.savez(path, size=comm.size, **results)


if __name__ == "__main__":
    main(sys.argv[1])
