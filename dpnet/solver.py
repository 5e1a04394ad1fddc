"""The Solver: one training loop for one process or many (see docs/architecture.md, "Solver").

Each step every process draws the same global minibatch from the shared seed, takes its shard, computes its shard's
gradients into the gradient exchange's buffer, the exchange sums them over the processes (weights n_r / N) and the
update rule is applied through the exchange (dpnet.parallel.exchange). One process is a communicator of size 1.
"""

import sys
import time

import numpy as np

from . import registry
from .ema import ExponentialAverage
from .model_state import (average_arrays, average_norm_state, broadcast_state, copy_into, load_state, norm_state,
                          split_state, whole_state)
from .parallel import as_communicator, check_in_sync, fault_injection_point, make_exchange, make_reducer
from .solver_checks import accepts_keyword, check_data, check_recipe, check_sizes
from .update import RuleUpdate

_DEFAULTS = dict(update_rule="sgd", optim_config=None, lr_decay=1.0, batch_size=100, num_epochs=10,
                 num_train_samples=1000, num_val_samples=None, checkpoint_name=None, print_every=10, verbose=True,
                 seed=None, comm=None, monitors=(), sync_batchnorm=True, augment=None, lr_schedule=None,
                 weight_decay=0.0, shard_optimizer=False, shared_memory=True, mixing=None, ema_decay=None, ema_every=1)


class Solver:
    """Trains `model` (`params` and `loss(X, y=None)`) on `data` (X_train, y_train, X_val, y_val).

    Keywords (all optional; README.md, "Solver", says what each does): update_rule, optim_config, lr_decay,
    batch_size (global), num_epochs, num_train_samples, num_val_samples, checkpoint_name, print_every, verbose, seed,
    comm, monitors, sync_batchnorm, augment, lr_schedule, weight_decay, shard_optimizer, shared_memory, mixing
    (dpnet.mixing.Mixing: MixUp, CutMix), ema_decay and ema_every (an average of the parameters, dpnet.ema).

    train() runs the loop and leaves the best parameters by validation accuracy in the model; use_params("best" |
    "final" | "ema") switches between them; check_accuracy(X, y) scores any split. Monitors (rank 0 only) receive
    on_train_begin(solver), on_iteration_end(solver, info), on_epoch_end(solver, info) and on_train_end(solver, info).
    The gradients in info['grads'] are views of a buffer the next step overwrites (sharded: None but at an epoch's
    last iteration); an update rule must not keep its `dw` either.
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
        check_data(model, data)
        self.update_rule = options["update_rule"]
        self.rule = self.update_rule if callable(self.update_rule) else registry.get_update_rule(self.update_rule)
        for key in ("lr_decay", "num_train_samples", "num_val_samples", "checkpoint_name", "print_every", "augment",
                    "lr_schedule", "mixing", "ema_decay", "ema_every"):
            setattr(self, key, options[key])
        self.optim_config = dict(options["optim_config"] or {})
        self.batch_size, self.num_epochs = int(options["batch_size"]), int(options["num_epochs"])
        self.comm = as_communicator(options["comm"])
        self.verbose = options["verbose"] and self.comm.rank == 0
        self.monitors = list(options["monitors"]) if self.comm.rank == 0 else []
        check_sizes(self.batch_size, self.num_epochs, len(self.y_train), self.comm.size)
        self.weight_decay = float(options["weight_decay"])
        self.shard_optimizer, self.shared_memory = bool(options["shard_optimizer"]), bool(options["shared_memory"])
        check_recipe(self)
        if self.mixing is not None and not self.mixing.enabled:
            self.mixing = None  # nothing is ever mixed: the plain path, with no stream drawn
        self.seed = self._shared_seed(options["seed"])
        self.sync_batchnorm = options["sync_batchnorm"]
        self._setup_model()
        self._exchange = None  # the gradient exchange, chosen at the first step (dpnet.parallel.make_exchange)
        self._gathered_configs = None  # sharded: the whole optimizer state, gathered on rank 0 at an epoch end
        self._watched = True  # whether any process has monitors or checkpoint_name (set by train())
        self._update = RuleUpdate(self.rule, self.weight_decay)
        self._reset()

    def _shared_seed(self, seed):
        if seed is None:
            seed = np.random.SeedSequence().entropy % 2**63
        buf = np.array([seed], dtype=np.int64)
        self.comm.bcast(buf)
        return int(buf[0])

    def _setup_model(self):
        """Make every replica start identical and wire the model's normalization layers to the processes."""
        for name in sorted(self.model.params):  # once per run: one Bcast per parameter is cheap enough
            self.model.params[name] = np.ascontiguousarray(self.model.params[name])
            self.comm.bcast(self.model.params[name])
        reducer = make_reducer(self.comm) if self.sync_batchnorm else None
        for param in getattr(self.model, "bn_params", []):
            param["reducer"] = reducer

    def _reset(self):
        """The bookkeeping of a fresh run (restoring a checkpoint overwrites it)."""
        self.epoch = self.iteration = self.best_val_acc = 0
        self.best_params, self.best_norm_state, self.final_params, self.final_norm_state = {}, {}, {}, {}
        self.loss_history, self.train_acc_history, self.val_acc_history = [], [], []
        # The average of the parameters (ema_decay), its validation accuracies, and which parameters are the best kept:
        # "live" (the trained ones) or "ema" (the average); None before the first evaluation.
        self.ema = None if self.ema_decay is None else ExponentialAverage(self.ema_decay, self.ema_every)
        self.ema_val_acc_history, self.best_source = [], None
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        self._stop_requested = False
        self.epoch_order = self._streams_epoch = None

    # ----------------------------------------------------------------------------------------------- a step
    @property
    def exchange(self):
        """The gradient exchange (dpnet.parallel.make_exchange), chosen at the first step; None before."""
        return self._exchange

    @property
    def iterations_per_epoch(self):
        return max(len(self.y_train) // self.batch_size, 1)

    def _stream(self, purpose, *keys):
        """A generator determined by the seed, a purpose and keys (such as the epoch): fresh at each epoch, so a run
        resumed at an epoch boundary draws exactly what the uninterrupted run draws."""
        return np.random.default_rng([self.seed, purpose, *keys])

    def _batch_indices(self):
        """The global minibatch of this iteration: a slice of the epoch's shuffle (the same on every process)."""
        epoch, j = divmod(self.iteration, self.iterations_per_epoch)
        if j == 0 or self.epoch_order is None:
            self.epoch_order = self._stream(0, epoch).permutation(len(self.y_train))
        if self._streams_epoch != epoch:
            self._streams_epoch = epoch
            self._augment_rng = self._stream(3, epoch)  # draws for the whole global batch: the same on all ranks
            if self.mixing is not None:
                self._mixing_rng = self._stream(4, epoch)  # likewise
            rng = self._stream(1, epoch, self.comm.rank)  # each process draws its own shard's random masks
            if getattr(self.model, "dropout_param", None) is not None:
                self.model.dropout_param["rng"] = rng
            for state in getattr(self.model, "bn_params", []):  # the layers' state dicts (dpnet.models.Sequential)
                state["rng"] = rng
        return self.epoch_order[j * self.batch_size:(j + 1) * self.batch_size]

    def _my_rows(self, n):
        """This process's part of n rows: contiguous, sizes differing by at most one."""
        r, size = self.comm.rank, self.comm.size
        return slice(r * n // size, (r + 1) * n // size)

    def _minibatch(self):
        """This process's shard of the iteration's global minibatch: (X, y, global batch size), y holding soft targets
        (n, C) when the batch is mixed. First the average (ema_decay) takes in the parameters of the last step when it
        is due: they are final now, and the coming update has not yet overwritten them."""
        if self.ema is not None and self.ema.due(self.iteration):
            self._fold_average()
        indices = self._batch_indices()
        n = len(indices)
        mine = self._my_rows(n)
        order = np.argsort(indices[mine])  # sorted rows gather faster; the mean does not depend on order
        shard = indices[mine][order]
        choices = None
        if self.augment is None:
            X = self.X_train[shard]
        else:
            choices = self.augment.draw(self._augment_rng, n)
            X = self.augment.take(self.X_train, shard, tuple(c[mine][order] for c in choices))
        if self.mixing is not None:
            return (*self._mix(X, indices, np.arange(n)[mine][order], choices), n)
        return X, self.y_train[shard], n

    def _mix(self, X, indices, positions, choices):
        """Mix the rows X, at `positions` in the global batch `indices`, with their partners as the batch's draw says
        (dpnet.mixing; the same draw on every process): a partner among this process's rows is copied from X, any
        other is taken from the training images, with the partner's own crop and flip (`choices`, drawn for the whole
        batch), the same values. Returns (X, soft targets (k, C)), or (X, labels) for a batch left unmixed."""
        labels = self.y_train[indices[positions]]
        mix = self.mixing.draw(self._mixing_rng, len(indices), X.shape[1:])
        if mix is None:
            return X, labels
        partners = mix.partner[positions]
        rows = indices[partners]
        here = np.full(len(indices), -1)
        here[positions] = np.arange(len(positions))
        here = here[partners]  # the row of X holding each partner, or -1
        others = np.empty_like(X)
        others[here >= 0] = X[here[here >= 0]]
        away = np.flatnonzero(here < 0)
        if len(away) and choices is None:
            others[away] = self.X_train[rows[away]]
        elif len(away):
            others[away] = self.augment.take(self.X_train, rows[away], tuple(c[partners[away]] for c in choices))
        X = self.mixing.apply(X, others, mix)
        return X, mix.targets(labels, self.y_train[rows], self.model.num_classes)

    def _fold_average(self):
        """The average (dpnet.ema) takes in the model's parameters and normalization state after this iteration."""
        self.ema.fold(whole_state(self.model.params, norm_state(self.model)), self.iteration)

    def _step(self):
        """One update: this shard's gradients, summed over the processes by the exchange, then the update rule.
        Returns (loss, the summed gradients or None, the global batch size, the seconds of each phase)."""
        start = time.perf_counter()
        X, y, batch = self._minibatch()
        drawn = time.perf_counter()
        fault_injection_point(self.comm, self.iteration)
        if self._exchange is None:
            self._exchange = make_exchange(self.comm, self.model.params, self.shard_optimizer, self.shared_memory)
        self._exchange.bind(self.model.params)
        if self.lr_schedule is not None:
            rate = self.optim_config["learning_rate"] * self.lr_schedule(self.iteration)
            for config in self.optim_configs.values():
                config["learning_rate"] = rate
        try:
            loss, grads = self._gradients(X, y)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc}, at iteration {self.iteration + 1}") from exc
        computed = time.perf_counter()
        loss = self._exchange.reduce(loss, grads, len(y) / batch)
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at iteration {self.iteration + 1}: stopping "
                                     "(try a smaller learning rate)")
        reduced = time.perf_counter()
        self._exchange.update(self.model.params, self.optim_configs, self._apply_rule)
        phases = dict(batch=drawn - start, gradients=computed - drawn, exchange=reduced - computed,
                      update=time.perf_counter() - reduced)
        return float(loss), self._exchange.summed_grads(), batch, phases

    def _gradients(self, X, y):
        """model.loss(X, y), writing into the exchange's buffer when the model's loss takes `grads` (and its
        parameters share one dtype): a step then allocates no parameter-sized array and packs nothing."""
        params, loss = self.model.params, self.model.loss
        one_dtype = len({w.dtype for w in params.values()}) == 1
        if not (one_dtype and accepts_keyword(getattr(loss, "__func__", loss), "grads")):
            return loss(X, y)
        return loss(X, y, grads=self._exchange.gradient_views(params))

    def _apply_rule(self, name, w, dw, config):
        """The update of parameter `name` on w, an array of the exchange's (whole or a segment; may be overwritten)."""
        return self._update(w, dw, config, is_weight=self.model.params[name].ndim >= 2)

    # ----------------------------------------------------------------------------------------------- evaluation
    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Fraction of samples whose highest score is the true label, scored in test mode; X (N, ...), y (N,).
        num_samples scores a random subset of that size (None: all). Collective: each process scores a slice."""
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

    def _evaluate(self):
        """Score the parameters (and the average of them, with ema_decay) and keep the best by validation accuracy:
        the live ones on a tie."""
        unsynced = self.comm.size > 1 and not self.sync_batchnorm
        if unsynced:
            average_norm_state(self.comm, self.model)
        train_acc = self.check_accuracy(self.X_train, self.y_train, num_samples=self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val, num_samples=self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc or len(self.val_acc_history) == 1:
            self._keep_best(val_acc, "live", self.model.params, norm_state(self.model))
        if self.ema is None:
            return
        self._fold_average()
        if unsynced:  # the running statistics it took in differed between the processes, as the model's did
            self.ema.arrays.update(average_arrays(self.comm, {k: v for k, v in self.ema.arrays.items()
                                                              if k.startswith("norm/")}))
        ema_acc = self._accuracy_of(self.ema.arrays, self.X_val, self.y_val, self.num_val_samples)
        self.ema_val_acc_history.append(ema_acc)
        if ema_acc > self.best_val_acc:
            self._keep_best(ema_acc, "ema", *split_state(self.ema.arrays))

    def _keep_best(self, val_acc, source, params, norm):
        """Copies of params and norm (normalization state) become the best, of `source` ("live" or "ema")."""
        self.best_val_acc, self.best_source = val_acc, source
        keep = self.comm.rank == 0  # rank 0 keeps the copy (for checkpoints and use_params); the others none
        self.best_params = copy_into(self.best_params, params) if keep else {}
        self.best_norm_state = copy_into(self.best_norm_state, norm) if keep else {}

    def _accuracy_of(self, state, X, y, num_samples=None):
        """check_accuracy(X, y, num_samples) of the model holding `state` (a state dict, dpnet.model_state) in place of
        its own arrays, which it holds again afterwards (the very same arrays: the exchange keeps owning them)."""
        live = whole_state(self.model.params, norm_state(self.model))
        load_state(self.model, state)
        try:
            return self.check_accuracy(X, y, num_samples=num_samples)
        finally:
            load_state(self.model, live)

    # ----------------------------------------------------------------------------------------------- the loop
    def train(self):
        """Run until num_epochs are done (continuing where a restored checkpoint left off); the model then holds the
        best parameters. A SystemExit raised on one rank of several during training ends the whole job with its code
        (the others would wait forever); stop() ends training on every rank."""
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
        # them: a monitor or checkpoint_name on any process.
        watched = np.array([bool(self.monitors) or self.checkpoint_name is not None], dtype=np.int64)
        self._watched = bool(self.comm.allreduce(watched, op="max")[0]) if self.comm.size > 1 else True
        self._notify("on_train_begin", self)
        while self.iteration < num_iterations and not self._stop_requested:
            start = time.perf_counter()
            loss, grads, batch, phases = self._step()
            seconds = time.perf_counter() - start
            self.loss_history.append(loss)
            self.iteration += 1
            t = self.iteration
            epoch_end = t % self.iterations_per_epoch == 0
            if grads is None and epoch_end and self._watched:  # sharded: the epoch's last gradient, for monitors
                grads = self._exchange.summed_grads(whole=True)
            if self.monitors:
                self._notify("on_iteration_end", self, IterationInfo(
                    iteration=t, epoch=self.epoch, loss=loss, learning_rate=self.learning_rate, grads=grads,
                    batch_size=batch, step_seconds=seconds, phase_seconds=phases,
                    samples_per_sec=batch / seconds if seconds > 0 else float("inf"),
                    _grad_norm=self._exchange.grad_norm))
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
        # The last parameters become final_params (copies only of shared memory); rank 0 alone keeps them.
        keep = self.comm.rank == 0
        if self._exchange is not None:
            self.final_params = self._exchange.final_arrays(self.model.params) if keep else {}
        self.final_norm_state = {name: value.copy() for name, value in norm_state(self.model).items()}
        self.use_params("best")
        if self._exchange is not None:
            self._exchange.release(self.model.params)
        self._notify("on_train_end", self, dict(iteration=self.iteration, epoch=self.epoch,
                                                best_val_acc=self.best_val_acc))
        return self

    def _end_epoch(self):
        if self.comm.size > 1:
            state = {**self.model.params, **norm_state(self.model)}
            if self.ema is not None:  # the average too: every process keeps it
                state.update({f"ema/{key}": value for key, value in self.ema.arrays.items()})
            check_in_sync(self.comm, [state[k] for k in sorted(state)],
                          where=f"after epoch {self.epoch} (iteration {self.iteration})")
        if self._exchange.sharded and self._watched:  # for the checkpoints rank 0 may write now
            self._gathered_configs = self._exchange.whole_configs(self.optim_configs)
        try:
            average = {} if self.ema is None else dict(ema_val_acc=self.ema_val_acc_history[-1])
            self._notify("on_epoch_end", self, dict(
                iteration=self.iteration, epoch=self.epoch, train_acc=self.train_acc_history[-1],
                val_acc=self.val_acc_history[-1], learning_rate=self.learning_rate, **average))
            if self.checkpoint_name is not None and self.comm.rank == 0:
                from .checkpoint import save_checkpoint

                save_checkpoint(f"{self.checkpoint_name}_epoch_{self.epoch}.npz", self)
        finally:
            self._gathered_configs = None

    def stop(self):
        """Ask train() to end after the current iteration (from a monitor, say); it returns normally."""
        self._stop_requested = True

    # ----------------------------------------------------------------------------------------------- kept state
    def use_params(self, which):
        """Load the "best" (by validation accuracy, of the live parameters and their average), "final" (the live ones
        after the last step) or "ema" (their average, as of its last fold: with ema_decay) parameters and
        normalization state into the model. With several processes rank 0 alone keeps the best and final ones and
        use_params broadcasts them: call it on every rank (each holds the average)."""
        if which == "ema":
            if self.ema is None or not self.ema.arrays:
                raise RuntimeError("use_params('ema'): there is no average of the parameters (ema_decay) yet")
            return load_state(self.model, {key: value.copy() for key, value in self.ema.arrays.items()})
        if which not in ("best", "final"):
            raise ValueError(f"use_params: expected 'best', 'final' or 'ema', got {which!r}")
        kept = whole_state(*{"best": (self.best_params, self.best_norm_state),
                             "final": (self.final_params, self.final_norm_state)}[which])
        if self.comm.size == 1:
            return load_state(self.model, {key: value.copy() for key, value in kept.items()})
        held = self.comm.bcast(np.array([len(kept) > 0], dtype=np.int64))
        if not held[0]:
            raise RuntimeError(f"use_params({which!r}): there are no {which} parameters yet (train() first)")
        loaded, *again = broadcast_state(self.comm, self.model, kept, copies=2, shared=self.shared_memory)
        load_state(self.model, loaded)
        if again:  # on one machine rank 0's kept copy becomes a second mapping of the loaded one's memory
            if which == "best":
                self.best_params, self.best_norm_state = split_state(again[0])
            else:
                self.final_params, self.final_norm_state = split_state(again[0])

    def optimizer_state(self):
        """The update rule's config of every parameter, state arrays shaped like the parameters (what checkpoints
        save). Sharded over several processes, the whole is assembled on rank 0 at each epoch end only (for the
        monitors and checkpoints of that moment); RuntimeError at other times or on other ranks."""
        if self._exchange is None or not self._exchange.sharded:
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


class IterationInfo(dict):
    """The `info` of on_iteration_end: a dict whose `grad_norm` (the summed gradient's norm: a pass over every
    gradient) is computed when a monitor first reads info["grad_norm"], so a step whose monitors do not read it
    spends nothing on it. info.get("grad_norm") does not compute it."""

    def __init__(self, _grad_norm=None, **items):
        super().__init__(items)
        self._known_norm = _grad_norm  # the exchange's, when its reduce computed it (sharded)

    def __missing__(self, key):
        if key != "grad_norm":
            raise KeyError(key)
        grads = self["grads"]
        norm = self._known_norm if grads is None else np.sqrt(sum(np.vdot(g, g) for g in grads.values()))
        self[key] = float(norm)
        return self[key]

