"""The Solver's training step, written with dpnet's public gradient-exchange protocol (dpnet.parallel.exchange).

A step: `exchange.bind(params)`; the model's loss with its gradients written into `exchange.gradient_views(params)`;
`exchange.reduce(loss, grads, weight)` (weight: this process's share of the global batch); `exchange.update(params,
configs, apply)` with the update rule's in-place variant (the pure rule when it has none), as the Solver applies a
built-in rule without weight decay. What the Solver adds around it (drawing the minibatch, the schedule, checks) is
left to the caller.
"""

import time

from dpnet import registry
from dpnet.parallel import SerialCommunicator, make_exchange


class ExchangeStep:
    """`step(X, y, weight=1.0) -> loss`: one training step of `model` with `rule` (a name or a rule function).

    `gradients(X, y)` (bind, forward and backward) and `update(loss, grads, weight)` (reduce, update) are its two
    halves. `comm` (default: one process) and `shard` / `shared_memory` choose the exchange as the Solver does
    (dpnet.parallel.make_exchange; collective). `apply_seconds` adds up the time spent inside the rule's calls.
    """

    def __init__(self, model, rule, optim_config, comm=None, shard=False, shared_memory=True):
        self.model = model
        self.comm = SerialCommunicator() if comm is None else comm
        rule = registry.get_update_rule(rule) if isinstance(rule, str) else rule
        self.rule = getattr(rule, "in_place", None) or rule
        self.configs = {name: dict(optim_config) for name in model.params}
        self.exchange = make_exchange(self.comm, model.params, shard=shard, shared_memory=shared_memory)
        self.apply_seconds = 0.0

    def apply(self, name, w, dw, config):
        start = time.perf_counter()
        result = self.rule(w, dw, config)
        self.apply_seconds += time.perf_counter() - start
        return result

    def gradients(self, X, y):
        params = self.model.params
        self.exchange.bind(params)
        return self.model.loss(X, y, grads=self.exchange.gradient_views(params))

    def update(self, loss, grads, weight=1.0):
        loss = self.exchange.reduce(loss, grads, weight)
        self.exchange.update(self.model.params, self.configs, self.apply)
        return loss

    def __call__(self, X, y, weight=1.0):
        return self.update(*self.gradients(X, y), weight)

    def release(self):
        """Collective: the exchange's buffers freed, the model holding arrays of its own."""
        self.exchange.release(self.model.params)
