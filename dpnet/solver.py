"""The Solver: one training loop for one process or many.

Each step, every process draws the same global minibatch indices from the shared seed, takes its own shard, computes
the gradient of its shard's mean loss, scales it by n_r / N, and all processes sum the scaled gradients (and the loss)
in one fused in-place allreduce, or on one machine in shared memory (dpnet.shared_sum); then every process applies the
update rule to its replica (with shard_optimizer, a reduce-scatter, each process updating its block of the parameters,
and an allgather, or on one machine the summed blocks and one shared parameter vector: dpnet.sharding). A single
process is the communicator of size 1: the same code, with the reduction skipped. The gradients are views of one
buffer, which the next step overwrites: an update rule must not keep a reference to its `dw` (copy it if it needs it
later; the built-in rules keep only arrays they compute). At the end of each epoch the replicas are checked to be
bitwise identical (dpnet.distributed.check_in_sync).

Monitors (see dpnet.monitor) receive `on_train_begin(solver)`, `on_iteration_end(solver, info)`,
`on_epoch_end(solver, info)` and `on_train_end(solver, info)` on rank 0 only. The iteration info holds `iteration`
(1-based), `epoch` (completed epochs), `loss`, `learning_rate`, `grads` (the averaged gradients, valid during the
call; with shard_optimizer only at an epoch's last iteration, else None), `grad_norm`, `batch_size`, `step_seconds`
and `samples_per_sec`; the epoch info holds `iteration`, `epoch`, `train_acc`, `val_acc` and `learning_rate`.
"""

import functools
import inspect
import sys
import time
import weakref

import numpy as np

from . import registry
from .distributed import FusedBuffer, check_in_sync, fault_injection_point, get_communicator, make_reducer
from .shared_copy import bcast_copy_on_write
from .shared_sum import SharedSum
from .sharding import ShardedState, check_shardable

_DEFAULTS = dict(update_rule="sgd", optim_config=None, lr_decay=1.0, batch_size=100, num_epochs=10,
                 num_train_samples=1000, num_val_samples=None, checkpoint_name=None, print_every=10, verbose=True,
                 seed=None, comm=None, monitors=(), sync_batchnorm=True, augment=None, lr_schedule=None,
                 weight_decay=0.0, shard_optimizer=False, shared_memory=True)


class Solver:
    """Trains a model on a data dict.

    model: any object with `params` (name -> ndarray) and `loss(X, y=None)` returning scores, or (loss, grads) when
    y is given. data: dict with X_train, y_train, X_val, y_val (arrays or lazily converting arrays indexed by rows).

    Keyword arguments (all optional):
    - update_rule: a registered rule name ('sgd', 'sgd_momentum', 'rmsprop', 'adam', or a plugin's) or a callable
      rule(w, dw, config) -> (next_w, config)
    - optim_config: hyper-parameters given to the rule; each parameter gets its own copy (and its own state)
    - lr_decay: the learning rate is multiplied by this after every epoch
    - batch_size: the global minibatch size (split across processes)
    - num_epochs: number of passes over the training set (each epoch is a fresh shuffle)
    - num_train_samples, num_val_samples: how many samples check_accuracy scores each epoch (None: all)
    - checkpoint_name: if given, a checkpoint `<name>_epoch_<k>.npz` is written (by rank 0) after every epoch
    - print_every: print the loss every this many iterations (rank 0, when verbose)
    - verbose: print progress
    - seed: seed of the minibatch order, the evaluation subsamples and the dropout masks (None: fresh entropy,
      shared by all processes through a broadcast)
    - comm: a communicator from dpnet.distributed; None picks the MPI world when launched by mpiexec, else serial
    - monitors: objects receiving the training events (rank 0 only)
    - sync_batchnorm: with more than one process, batch statistics are those of the global batch (default True)
    - augment: a dpnet.augment.Augmentation applied to every training minibatch as it is drawn (None: none)
    - lr_schedule: a callable factor(iteration) multiplying optim_config['learning_rate'] at every iteration (see
      dpnet.schedules); replaces lr_decay
    - weight_decay: decoupled weight decay: after each update, weights (parameters with two or more dimensions, not
      biases or normalization scales) shrink by learning_rate * weight_decay times themselves
    - shard_optimizer: with more than one process, each process keeps the update rule's state of, and updates, only
      its block of the parameters (dpnet.sharding): the state's memory and the update's time are divided by the
      number of processes, for the same parameters. Needs an elementwise rule (the built-in ones are). The monitors'
      info['grads'] is then None but at the last iteration of each epoch, where the whole gradient is gathered
      (info['grad_norm'] is always the whole gradient's norm); the optimizer state is gathered for checkpoints at
      epoch ends (see optimizer_state). Both gathers happen only when some process has monitors or checkpoint_name
    - shared_memory: processes that all run on one machine keep their gradients in shared memory and sum them where
      they lie instead of copying them through MPI (default True; dpnet.shared_sum); with shard_optimizer the
      parameters too: one copy per machine instead of one per process (dpnet.sharding), and, for a model whose loss
      takes weight_factors (FullyConnectedNet), each process computes only its block of the weight gradients, from
      every process's activations (dpnet.factored_grads). During train() the
      gradients given to monitors and, sharded, the model's arrays are then shared memory (change the arrays on no
      process) that train() frees at its end: monitors must copy what they keep beyond a call. train() leaves each
      process parameter arrays of its own; on one machine they are copy-on-write mappings of one copy in memory
      (dpnet.shared_copy), as are rank 0's best_params or final_params once use_params loaded them: a process's
      writes to them stay its own
    """

    def __init__(self, model, data, **kwargs):
        unknown = sorted(set(kwargs) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"Solver got unknown keyword argument(s): {', '.join(unknown)}; "
                            f"valid ones are: {', '.join(sorted(_DEFAULTS))}")
        options = {**_DEFAULTS, **kwargs}
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]
        self._check_data()

        self.update_rule = options["update_rule"]
        self._rule = self.update_rule if callable(self.update_rule) else registry.get_update_rule(self.update_rule)
        self.optim_config = dict(options["optim_config"] or {})
        self.lr_decay = options["lr_decay"]
        self.batch_size = int(options["batch_size"])
        self.num_epochs = int(options["num_epochs"])
        self.num_train_samples = options["num_train_samples"]
        self.num_val_samples = options["num_val_samples"]
        self.checkpoint_name = options["checkpoint_name"]
        self.print_every = options["print_every"]
        self.comm = options["comm"] if options["comm"] is not None else get_communicator()
        self.verbose = options["verbose"] and self.comm.rank == 0
        self.monitors = list(options["monitors"]) if self.comm.rank == 0 else []
        self._check_sizes()

        self.augment = options["augment"]
        self.lr_schedule = options["lr_schedule"]
        self.weight_decay = float(options["weight_decay"])
        self.shard_optimizer = bool(options["shard_optimizer"])
        self.shared_memory = bool(options["shared_memory"])
        self._check_recipe()

        self.seed = self._shared_seed(options["seed"])
        self.sync_batchnorm = options["sync_batchnorm"]
        self._setup_model()
        self._fused = None  # the gradient buffer (of the allreduce too), laid out at the first step
        self._shared_sum = None  # replicated, on one machine: the gradient buffers in shared memory (SharedSum)
        self._shards = None  # with shard_optimizer and several processes: the ShardedState, made at the first step
        self._gathered_configs = None  # the whole optimizer state, gathered on rank 0 at an epoch end (sharded)
        self._watched = True  # whether any process has monitors or checkpoint_name (set by train())
        self._grad_norm = None  # the last sharded step's gradient norm
        self._in_place = getattr(self._rule, "in_place", None)  # the rule's in-place variant, if it has one
        # whether that variant scales w itself (weight decay within its own pass; the built-in rules do)
        self._in_place_scales = self._in_place is not None and _accepts_keyword(self._in_place, "w_scale")
        # name -> the parameter array this Solver made, which it may update in place (weak: an array the model no
        # longer holds, e.g. after use_params, is not kept alive for it)
        self._owned = weakref.WeakValueDictionary()
        self._reset()

    # ----------------------------------------------------------------------------------------------- setup
    def _check_data(self):
        n = len(self.y_train)
        if n == 0:
            raise ValueError("the training set is empty (data['X_train'] has no samples)")
        for split in ("train", "val"):
            X, y = getattr(self, f"X_{split}"), np.asarray(getattr(self, f"y_{split}"))
            if y.ndim != 1 or X.shape[0] != y.shape[0]:
                raise ValueError(f"data['X_{split}'] has {X.shape[0]} samples but data['y_{split}'] has shape "
                                 f"{y.shape}: expected ({X.shape[0]},)")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"data['y_{split}'] must hold integer labels, got dtype {y.dtype}")
            num_classes = getattr(self.model, "num_classes", None)
            if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
                raise ValueError(f"data['y_{split}'] has labels in [{y.min()}, {y.max()}], outside "
                                 f"[0, {num_classes if num_classes is not None else 'C'})")
            if isinstance(X, np.ndarray) and X.dtype.kind == "f" and not np.isfinite(X).all():
                raise ValueError(f"data['X_{split}'] contains NaN or inf")

    def _check_sizes(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0, got {self.num_epochs}")
        if self.batch_size < self.comm.size:
            raise ValueError(f"the global batch_size ({self.batch_size}) is smaller than the number of processes "
                             f"({self.comm.size}): every process needs at least one sample")
        if len(self.y_train) < self.comm.size:
            raise ValueError(f"the training set has {len(self.y_train)} samples, fewer than the number of processes "
                             f"({self.comm.size}): every process needs at least one sample")

    def _check_recipe(self):
        if self.augment is not None and getattr(self.X_train, "ndim", 0) != 4:
            raise ValueError(f"augment needs images of shape (N, C, H, W); data['X_train'] has shape "
                             f"{self.X_train.shape}")
        if self.lr_schedule is not None:
            if self.lr_decay != 1.0:
                raise ValueError("give lr_decay or lr_schedule, not both")
            if "learning_rate" not in self.optim_config:
                raise ValueError("lr_schedule needs optim_config['learning_rate'], the rate it scales")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.shard_optimizer:
            name = self.update_rule if isinstance(self.update_rule, str) else getattr(self.update_rule, "__name__",
                                                                                     repr(self.update_rule))
            check_shardable(self._rule, name)
            if self.weight_decay and "learning_rate" not in self.optim_config:
                raise ValueError("weight_decay with shard_optimizer needs optim_config['learning_rate']")

    def _shared_seed(self, seed):
        if seed is None:
            seed = np.random.SeedSequence().entropy % 2**63
        buf = np.array([seed], dtype=np.int64)
        self.comm.bcast(buf)
        return int(buf[0])

    def _setup_model(self):
        """Make every replica start identical and wire the model's stateful layers to this Solver."""
        for name in sorted(self.model.params):  # once per run: one Bcast per parameter is cheap enough
            self.model.params[name] = np.ascontiguousarray(self.model.params[name])
            self.comm.bcast(self.model.params[name])
        reducer = make_reducer(self.comm) if self.sync_batchnorm else None
        for param in getattr(self.model, "bn_params", []):
            param["reducer"] = reducer

    def _reset(self):
        """Set up the bookkeeping; called at construction (resuming from a checkpoint overwrites it)."""
        self.epoch = 0
        self.iteration = 0
        self.best_val_acc = 0
        self.best_params = {}
        self.best_norm_state = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        self.final_params = {}
        self.final_norm_state = {}
        self._stop_requested = False
        self._epoch_order = None
        self._streams_epoch = None

    # ----------------------------------------------------------------------------------------------- steps
    @property
    def iterations_per_epoch(self):
        return max(len(self.y_train) // self.batch_size, 1)

    def _stream(self, purpose, *keys):
        """A random generator determined by the seed, a purpose and keys (such as the epoch).

        Every random draw comes from such a stream, fresh at each epoch, so a run resumed at an epoch boundary draws
        exactly what the uninterrupted run draws, without saving generator states.
        """
        return np.random.default_rng([self.seed, purpose, *keys])

    def _batch_indices(self):
        """The global minibatch of this iteration: a slice of the epoch's shuffle (the same on every process)."""
        epoch, j = divmod(self.iteration, self.iterations_per_epoch)
        if j == 0 or self._epoch_order is None:
            self._epoch_order = self._stream(0, epoch).permutation(len(self.y_train))
        if self._streams_epoch != epoch:
            self._streams_epoch = epoch
            self._augment_rng = self._stream(3, epoch)  # draws for the whole global batch: the same on all ranks
            dropout_param = getattr(self.model, "dropout_param", None)
            if dropout_param is not None:
                # Each process draws the dropout masks of its own shard, from its own stream.
                dropout_param["rng"] = self._stream(1, epoch, self.comm.rank)
        return self._epoch_order[j * self.batch_size:(j + 1) * self.batch_size]

    def _my_rows(self, n):
        """This process's part of n rows: contiguous, sizes differing by at most one."""
        r, size = self.comm.rank, self.comm.size
        return slice(r * n // size, (r + 1) * n // size)

    def _minibatch(self):
        """This process's shard of the iteration's global minibatch: (X, y, global batch size)."""
        indices = self._batch_indices()
        n = len(indices)
        mine = self._my_rows(n)
        order = np.argsort(indices[mine])  # sorted rows gather faster; the mean does not depend on order
        shard = indices[mine][order]
        X = self.X_train[shard]
        if self.augment is not None:
            choices = self.augment.draw(self._augment_rng, n)
            X = self.augment.apply(X, tuple(c[mine][order] for c in choices))
        return X, self.y_train[shard], n

    def _step(self):
        """One update: gradients of the global minibatch, averaged over processes, then the update rule."""
        X, y, batch = self._minibatch()
        fault_injection_point(self.comm, self.iteration)
        if self.shard_optimizer and self.comm.size > 1:
            factored = self._factored_params()
            if (self._shards is None or not self._shards.matches(self.model.params)
                    or self._shards.capacity != (self.batch_size if factored else None)):
                if self._shards is not None:
                    self._shards.release(self.model.params)
                self._shards = ShardedState(self.comm, self.model.params, shared_memory=self.shared_memory,
                                            factored_params=factored, capacity=self.batch_size if factored else None)
            self._shards.bind(self.model.params)
            self._shards.start(self._my_rows(batch), len(y) / batch, batch)
        if self.lr_schedule is not None:
            rate = self.optim_config["learning_rate"] * self.lr_schedule(self.iteration)
            for config in self.optim_configs.values():
                config["learning_rate"] = rate
        try:
            loss, grads = self._gradients(X, y)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc}, at iteration {self.iteration + 1}") from exc
        if self._shards is not None:
            loss, self._grad_norm = self._shards.reduce(loss, len(y) / batch, grads)
            grads = None  # each process holds its block of the summed gradient only
        elif self.comm.size > 1:
            loss = self._allreduce(loss, grads, len(y) / batch)
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at iteration {self.iteration + 1}: stopping "
                                     "(try a smaller learning rate)")
        if self._shards is not None:
            self._shards.update(self._update_segment)
        else:
            self._update(grads)
        return float(loss), grads, batch

    def _gradients(self, X, y):
        """model.loss(X, y). A model that accepts `grads` writes them into views of one buffer laid out once (which
        is also what the allreduce sends): a step then allocates no parameter-sized array and packs nothing."""
        params, loss = self.model.params, self.model.loss
        if not _accepts_grads(getattr(loss, "__func__", loss)) or len({w.dtype for w in params.values()}) != 1:
            return loss(X, y)
        if self._shards is not None and self._shards.factored:
            return loss(X, y, grads=dict(self._shards.grads), weight_factors=self._shards.weight_factors)
        if self._shards is not None:
            return loss(X, y, grads=dict(self._shards.grads))
        return loss(X, y, grads=dict(self._gradient_buffer(params).views))

    def _factored_params(self):
        """The weights whose gradients the model can deliver as factors (model.factored_params, for a loss taking
        `grads` and `weight_factors`), which sharded state on one machine then computes block by block
        (dpnet.factored_grads); () for any other model."""
        loss = getattr(self.model.loss, "__func__", self.model.loss)
        if not (_accepts_grads(loss) and _accepts_keyword(loss, "weight_factors")):
            return ()
        return tuple(getattr(self.model, "factored_params", ()))

    def _gradient_buffer(self, arrays):
        """The FusedBuffer the gradients (and the loss, its extra slot) are summed in, laid out anew (collectively
        when the processes share memory: dpnet.shared_sum) when `arrays` do not match it."""
        if self._fused is not None and self._fused.matches(arrays):
            return self._fused
        if self._shared_sum is not None:
            self._shared_sum.free()
        self._shared_sum = (SharedSum.create(self.comm, arrays, extra=1)
                            if self.shared_memory and self.comm.size > 1 else None)
        self._fused = self._shared_sum.vector if self._shared_sum is not None else FusedBuffer(arrays, extra=1)
        return self._fused

    def _update(self, grads):
        """Apply the update rule, and decoupled weight decay, to every parameter.

        A rule with an in-place variant (`rule.in_place`, see dpnet.optim) updates the parameters the Solver owns in
        place: no parameter-sized array is allocated. The Solver owns the arrays it made: the first update of a
        parameter array it did not make (the model's initial one, one a user put in model.params) works on a copy, so
        arrays held elsewhere never change under their holder.
        """
        for name, w in self.model.params.items():
            dw, config = grads[name], self.optim_configs[name]
            decay = self.weight_decay if w.ndim >= 2 else 0.0
            if self._in_place is not None and self._can_update_in_place(w, dw, config, decay):
                if self._owned.get(name) is not w:
                    w = self._owned[name] = w.copy()
                # w - lr * (step + decay * w), as AdamW: the built-in steps do not depend on w
                scale = 1 - config["learning_rate"] * decay if decay else 1
                next_w, config = self._apply_in_place(w, dw, config, scale)
            else:
                next_w, config = self._rule(w, dw, config)
                if decay:
                    if "learning_rate" not in config:
                        raise ValueError("weight_decay scales with the learning rate, but the update rule's config "
                                         "has no 'learning_rate'")
                    next_w -= (config["learning_rate"] * decay) * w
            self.model.params[name], self.optim_configs[name] = next_w, config

    def _update_segment(self, name, w, dw):
        """The sharded update of this process's segment of parameter `name` (flat views; see dpnet.sharding)."""
        config = self._shards.shard_config(name, self.optim_configs[name])
        decay = self.weight_decay if len(self._shards.shapes[name]) >= 2 else 0.0
        self._apply_in_place(w, dw, config, 1 - config["learning_rate"] * decay if decay else 1)

    def _apply_in_place(self, w, dw, config, w_scale):
        """The rule's in-place variant on w, after multiplying w by w_scale (weight decay): within the rule's own pass
        over w when it takes `w_scale` (the built-in rules do), else as a pass of its own."""
        if w_scale == 1:
            return self._in_place(w, dw, config)
        if self._in_place_scales:
            return self._in_place(w, dw, config, w_scale=w_scale)
        w *= w_scale
        return self._in_place(w, dw, config)

    @staticmethod
    def _can_update_in_place(w, dw, config, decay):
        return (isinstance(w, np.ndarray) and isinstance(dw, np.ndarray) and w.shape == dw.shape
                and w.dtype.kind == "f" and w.dtype == np.result_type(w, dw)
                and (not decay or "learning_rate" in config))

    def _allreduce(self, loss, grads, weight):
        """Sum weight * (grads, loss) over all processes in one buffer, laid out at the first step and reused.

        Gradients the model wrote into the buffer are scaled in place; others are packed (scaled), the only copy.
        On one machine the buffer is shared memory and the weights are applied in the sum (dpnet.shared_sum).
        Afterwards grads[name] are views of the buffer. Returns the summed loss.
        """
        fused = self._gradient_buffer(grads)
        if self._shared_sum is not None:  # each process sums its block from all, weighted, then copies the others'
            fused.pack(grads)
            fused.extra[0] = loss
            self._shared_sum.sum_block(weight)
            self._shared_sum.gather()
        else:
            fused.pack(grads, weight)
            fused.extra[0] = loss * weight
            self.comm.allreduce(fused.buffer)
        grads.update(fused.views)
        return fused.extra[0]

    # ----------------------------------------------------------------------------------------------- evaluation
    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Fraction of samples whose highest score is the true label, scored in test mode.

        Inputs: X (N, d_1, ..., d_k); y (N,); num_samples: score a random subset of this size (None: all N);
        batch_size: samples scored per forward pass. With several processes each scores a slice and the counts
        are summed, so every process returns the same accuracy.
        """
        N = X.shape[0]
        indices = np.arange(N)
        if num_samples is not None and N > num_samples:
            indices = np.sort(self._stream(2, self.iteration, N).choice(N, num_samples, replace=False))
        mine = indices[self._my_rows(len(indices))]
        correct = 0
        for start in range(0, len(mine), batch_size):
            rows = mine[start:start + batch_size]
            scores = self.model.loss(X[rows])
            correct += int(np.count_nonzero(np.argmax(scores, axis=1) == np.asarray(y)[rows]))
        counts = np.array([correct, len(mine)], dtype=np.int64)
        self.comm.allreduce(counts)
        return counts[0] / max(counts[1], 1)

    # ----------------------------------------------------------------------------------------------- the loop
    def train(self):
        """Run the optimization until num_epochs are done (continuing where a restored checkpoint left off).

        At the end the model holds the parameters with the best validation accuracy (best_params), with the
        normalization state (running statistics) they were evaluated with; use_params("final") switches to the last
        (final_params). With several processes only rank 0 keeps best_params and final_params. A new best is copied
        into best_params's arrays (not into new ones): copy them to keep an earlier best.

        With several processes, a SystemExit raised on one rank during training (say, a monitor on rank 0 calling
        sys.exit) ends the whole job through MPI_Abort with its exit code: the other ranks, waiting in a collective,
        would otherwise wait forever. To end training early on every rank, call stop().
        """
        try:
            return self._train()
        except SystemExit as exc:
            if self.comm.size == 1:
                raise
            code = exc.code if isinstance(exc.code, int) and exc.code else 1
            print(f"dpnet: rank {self.comm.rank} of {self.comm.size} left training with SystemExit({exc.code!r}); "
                  "aborting all ranks (solver.stop() ends training on every rank)", file=sys.stderr, flush=True)
            self.comm.abort(code)

    def _train(self):
        num_iterations = self.num_epochs * self.iterations_per_epoch
        self._stop_requested = False
        # Sharded, the whole gradient and optimizer state are gathered on rank 0 at epoch ends only for someone to read
        # them: a monitor or checkpoint_name on any process (monitors usually live on rank 0 alone).
        watched = np.array([bool(self.monitors) or self.checkpoint_name is not None], dtype=np.int64)
        self._watched = bool(self.comm.allreduce(watched, op="max")[0]) if self.comm.size > 1 else True
        self._notify("on_train_begin", self)
        while self.iteration < num_iterations and not self._stop_requested:
            start = time.perf_counter()
            loss, grads, batch = self._step()
            seconds = time.perf_counter() - start
            self.loss_history.append(loss)
            self.iteration += 1
            t = self.iteration
            epoch_end = t % self.iterations_per_epoch == 0
            if grads is None and epoch_end and self._watched:  # sharded: the epoch's last gradient, for monitors
                grads = self._shards.gather_grads()
            if self.monitors:
                self._notify("on_iteration_end", self, dict(
                    iteration=t, epoch=self.epoch, loss=loss, learning_rate=self.learning_rate,
                    grads=grads, grad_norm=self._grad_norm if grads is None else
                    float(np.sqrt(sum(np.vdot(g, g) for g in grads.values()))),
                    batch_size=batch,
                    step_seconds=seconds, samples_per_sec=batch / seconds if seconds > 0 else float("inf")))
            if epoch_end:
                self.epoch += 1
                for config in self.optim_configs.values():
                    if "learning_rate" in config:
                        config["learning_rate"] *= self.lr_decay
            if t == 1 or t == num_iterations or epoch_end:
                self._evaluate()
            if epoch_end:
                self._end_epoch()
            if self.comm.size > 1:  # monitors run on rank 0 only: every rank must learn of a stop request
                flag = np.array([self._stop_requested], dtype=np.int64)
                self._stop_requested = bool(self.comm.allreduce(flag, op="max")[0])
            if self.verbose and self.print_every and (t - 1) % self.print_every == 0:
                print(f"(Epoch {self.epoch} / {self.num_epochs}) (Iteration {t} / {num_iterations}) "
                      f"loss: {loss:f} train acc: {self.train_acc_history[-1]:f} "
                      f"val_acc: {self.val_acc_history[-1]:f}")
        # The last parameters themselves become final_params (the model gets copies of the best ones next): no
        # parameter-sized copy, but of shared memory, which is freed below. Disowned, so that further training never
        # updates them in place. With several processes rank 0 alone keeps them, as it alone keeps the best ones.
        keep = self.comm.size == 1 or self.comm.rank == 0
        last = dict(self.model.params)
        if self._shards is not None and self._shards.shared and keep:
            last = {name: value.copy() for name, value in last.items()}
        self.final_params = last if keep else {}
        self._owned.clear()
        self.final_norm_state = {name: value.copy() for name, value in self._norm_state().items()}
        self.use_params("best")
        if self._shards is not None:
            self._shards.release(self.model.params)
        if self._shared_sum is not None:
            self._shared_sum.free()
            self._shared_sum = self._fused = None
        self._notify("on_train_end", self, dict(iteration=self.iteration, epoch=self.epoch,
                                                best_val_acc=self.best_val_acc))
        return self

    def stop(self):
        """Ask train() to end after the current iteration (e.g. from a monitor that reached its target); train()
        then returns normally, with the best parameters loaded."""
        self._stop_requested = True

    def use_params(self, which):
        """Load the "best" (by validation accuracy) or the "final" parameters and normalization state into the
        model (both are known once train() has returned).

        With several processes only rank 0 keeps them (a copy of the model per process would be waste: the replicas
        are identical) and use_params broadcasts them, so it is collective: call it on every rank.
        """
        if which not in ("best", "final"):
            raise ValueError(f"use_params: expected 'best' or 'final', got {which!r}")
        if self.comm.size > 1:
            params, norm = self._broadcast_kept(which)
        else:
            params, norm = {"best": (self.best_params, self.best_norm_state),
                            "final": (self.final_params, self.final_norm_state)}[which]
            params = {name: value.copy() for name, value in params.items()}
            norm = {name: value.copy() for name, value in norm.items()}
        self.model.params.update(params)
        for name, value in norm.items():
            i, key = name.split("/", 1)
            self.model.bn_params[int(i)][key] = value

    def _broadcast_kept(self, which):
        """Rank 0's best or final parameters and normalization state, on every rank (new arrays). Collective.

        On one machine the new arrays are copy-on-write mappings of one copy in memory (dpnet.shared_copy), shared
        until a process writes to its own; rank 0's kept ones then become a second such mapping, so that the copy it
        kept and the model's are one in memory too."""
        kept = {"best": (self.best_params, self.best_norm_state), "final": (self.final_params, self.final_norm_state)}
        params, norm = kept[which]
        state = {f"param/{name}": value for name, value in self.model.params.items()}
        state.update({f"norm/{name}": value for name, value in self._norm_state().items()})
        held = np.array([len(params) > 0], dtype=np.int64)
        self.comm.bcast(held)
        if not held[0]:
            raise RuntimeError(f"use_params({which!r}): there are no {which} parameters yet (train() first)")
        # Laid out as a FusedBuffer of this rank's arrays would be: the same names and shapes on every rank.
        names = sorted(state)
        size, dtype = sum(state[k].size for k in names), np.result_type(*(state[k].dtype for k in names))
        root = self.comm.rank == 0
        parts = [params[k[len("param/"):]] if k.startswith("param/") else norm[k[len("norm/"):]] for k in names] \
            if root else None
        buffers = bcast_copy_on_write(self.comm, parts, size, dtype, copies=2 if root else 1, shared=self.shared_memory)
        loaded, *kept_again = [self._unfuse(FusedBuffer(state, buffer=buffer), state) for buffer in buffers]
        if kept_again:
            params, norm = kept_again[0]
            if which == "best":
                self.best_params, self.best_norm_state = params, norm
            else:
                self.final_params, self.final_norm_state = params, norm
        return loaded

    @staticmethod
    def _unfuse(fused, state):
        """(params, norm state) from the views of a FusedBuffer laid out from `state`, in state's dtypes."""
        out = {key: view.astype(state[key].dtype, copy=False) for key, view in fused.views.items()}
        return ({k[len("param/"):]: v for k, v in out.items() if k.startswith("param/")},
                {k[len("norm/"):]: v for k, v in out.items() if k.startswith("norm/")})

    def _norm_state(self):
        """The float arrays of the normalization layers' state (running statistics), by "<layer>/<key>"."""
        return {f"{i}/{key}": value for i, param in enumerate(getattr(self.model, "bn_params", []))
                for key, value in param.items() if isinstance(value, np.ndarray) and value.dtype.kind == "f"}

    def _average_norm_state(self):
        """Without synchronized batchnorm each replica's running statistics follow its own shards: average them, so
        that every process evaluates, and rank 0 saves, the same model."""
        state = self._norm_state()
        if state:
            fused = FusedBuffer(state)
            self.comm.allreduce(fused.pack(state, 1 / self.comm.size))
            for name, view in fused.views.items():
                i, key = name.split("/", 1)
                self.model.bn_params[int(i)][key] = view.astype(state[name].dtype, copy=True)

    def _evaluate(self):
        if self.comm.size > 1 and not self.sync_batchnorm:
            self._average_norm_state()
        train_acc = self.check_accuracy(self.X_train, self.y_train, num_samples=self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val, num_samples=self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc or len(self.val_acc_history) == 1:
            self.best_val_acc = val_acc
            # Rank 0 keeps the copy (for the checkpoints it writes and use_params); the other ranks none.
            keep = self.comm.rank == 0
            self.best_params = _copy_into(self.best_params, self.model.params) if keep else {}
            self.best_norm_state = _copy_into(self.best_norm_state, self._norm_state()) if keep else {}

    def _end_epoch(self):
        if self.comm.size > 1:
            state = {**self.model.params, **self._norm_state()}
            check_in_sync(self.comm, [state[k] for k in sorted(state)],
                          where=f"after epoch {self.epoch} (iteration {self.iteration})")
        if self._shards is not None and self._watched:  # for the checkpoints rank 0 may write now
            self._gathered_configs = self._shards.gather_configs(self.optim_configs)
        try:
            self._notify("on_epoch_end", self, dict(
                iteration=self.iteration, epoch=self.epoch, train_acc=self.train_acc_history[-1],
                val_acc=self.val_acc_history[-1], learning_rate=self.learning_rate))
            if self.checkpoint_name is not None and self.comm.rank == 0:
                from .checkpoint import save_checkpoint

                save_checkpoint(f"{self.checkpoint_name}_epoch_{self.epoch}.npz", self)
        finally:
            self._gathered_configs = None

    def optimizer_state(self):
        """The update rule's config of every parameter, state arrays shaped like the parameters (what checkpoints
        save). With shard_optimizer and several processes each process holds its block of the state only: the whole
        is assembled on rank 0 at each epoch end, for the monitors and checkpoints of that moment; RuntimeError at
        other times or on other ranks."""
        if self._shards is None:
            return self.optim_configs
        if self._gathered_configs is None:
            raise RuntimeError("with shard_optimizer the optimizer state is spread over the processes: it is gathered "
                               "on rank 0 at each epoch end, when monitors (on_epoch_end) and checkpoint_name write "
                               "checkpoints")
        return self._gathered_configs

    @property
    def learning_rate(self):
        """The current learning rate (of the first parameter's config; all decay together)."""
        config = next(iter(self.optim_configs.values()), {})
        return float(config.get("learning_rate", self.optim_config.get("learning_rate", float("nan"))))

    def _notify(self, event, *args):
        for monitor in self.monitors:
            handler = getattr(monitor, event, None)
            if handler is not None:
                handler(*args)


def _copy_into(kept, arrays):
    """Copies of `arrays` (name -> array) in `kept`'s arrays where their shapes and dtypes match (no parameter-sized
    allocation, and no second copy alive while the first is replaced, at every new best), else in new arrays."""
    def copy(name, value):
        old = kept.get(name)
        fits = isinstance(old, np.ndarray) and old.shape == value.shape and old.dtype == value.dtype
        if fits and old.flags.writeable:
            np.copyto(old, value)
            return old
        return value.copy()

    return {name: copy(name, value) for name, value in arrays.items()}


def _accepts_grads(loss_function):
    """Whether a model's loss function takes the `grads` keyword (output arrays for the gradients)."""
    return _accepts_keyword(loss_function, "grads")


def _accepts_keyword(function, keyword):
    """Whether `function` takes the keyword argument `keyword` (cached, for hashable functions)."""
    try:
        return _signature_has(function, keyword)
    except TypeError:  # an unhashable callable: not cached
        return _signature_has.__wrapped__(function, keyword)


@functools.lru_cache(maxsize=128)
def _signature_has(function, keyword):
    try:
        return keyword in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no inspectable signature
        return False
