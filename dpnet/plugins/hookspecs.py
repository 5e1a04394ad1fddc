"""What a plugin may provide: the pluggy hook specifications of the project ``dpnet``.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl` whose names are the hooks below.
It is found through an entry point in the group ``dpnet``; dpnet's own built-ins (``dpnet.plugins.builtins``) implement
the same hooks, so built-in and plugin layers travel one path. See ``docs/plugins.md`` for the guide.

Hooks take no arguments and are called once per process, when the registry is first used; what they return is
validated, and a plugin whose hook raises or returns something malformed is reported by name and distribution
(``dpnet.registry.PluginError``). dpnet calls each plugin's implementation on its own (to know who provided what),
so hook wrappers are not supported on these hooks.
"""

import pluggy

PROJECT = "dpnet"

#: Marker for the hook specifications below (used by dpnet only).
hookspec = pluggy.HookspecMarker(PROJECT)

#: Marker for hook implementations: ``from dpnet import hookimpl`` and decorate ``dpnet_layers``,
#: ``dpnet_update_rules`` and/or ``dpnet_models`` in your plugin module.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dpnet_layers():
    """Layers this plugin provides.

    Return a list of ``dpnet.Layer(name, kind, forward, backward)`` records, where ``kind`` is one of

    - ``"activation"``: ``forward(x) -> (out, cache)``, ``backward(dout, cache) -> dx``; ``out`` and ``dx`` have
      ``x``'s shape and dtype;
    - ``"normalization"``: ``forward(x, gamma, beta, param) -> (out, cache)``,
      ``backward(dout, cache) -> (dx, dgamma, dbeta)``; ``x`` is ``(N, D)``, ``gamma`` and ``beta`` are ``(D,)``,
      ``param`` is a dict holding at least ``"mode"`` (``"train"`` or ``"test"``) that the layer may keep state in
      (like batchnorm's running averages);
    - ``"loss"``: ``forward(scores, y) -> (loss, dscores)`` for scores ``(N, C)`` and integer labels ``y`` ``(N,)``;
      ``backward`` is ``None``;
    - ``"layer"`` (a layer with parameters and state of its own, for ``dpnet.models.Sequential``):
      ``Layer(name, "layer", forward, backward, init=init)`` with ``init(in_dim, rng, dtype, **options) -> (params,
      out_dim)``, ``forward(x, params, state) -> (out, cache)`` and ``backward(dout, cache) -> (dx, grads)``;
      ``in_dim``/``out_dim`` are one sample's shape, ``params`` and ``grads`` dicts of arrays with the same keys,
      ``state`` a dict living as long as the model (``"mode"``; the Solver adds ``"rng"`` and, for synchronized
      statistics over processes, ``"reducer"``). docs/plugins.md, "A layer with weights", has the whole contract.

    Names are per kind, unique across dpnet and every installed plugin (a clash is an error, never an override), and
    are what users type: ``FullyConnectedNet(activation=name)``, ``--activation name``.
    """


@hookspec
def dpnet_update_rules():
    """Update rules this plugin provides.

    Return a dict ``{name: rule}``; each rule is ``rule(w, dw, config=None) -> (next_w, config)``: it must not modify
    ``w`` or ``dw``, keeps its hyper-parameters (``learning_rate`` among them) and all of its state in the ``config``
    dict (created when ``None``, defaults filled in with ``setdefault``) and returns that dict. Names are unique
    across dpnet and every installed plugin and are what users type: ``Solver(update_rule=name)``,
    ``--update-rule name``.
    """


@hookspec
def dpnet_models():
    """Named networks this plugin provides.

    Return a dict ``{name: factory}``; each factory is ``factory(**options) -> model``, a model as
    ``dpnet.models.Sequential`` is one (``params``, ``loss(X)``, ``loss(X, y)``), typically a ``Sequential`` of a
    fixed spec. ``python -m dpnet.train --model name --model-option key=value ...`` builds it: the factory gets the
    ``--model-option`` options and, for each of the keywords ``input_dim`` (``(3, 32, 32)``), ``loss``, ``reg``,
    ``label_smoothing``, ``dtype`` (a ``numpy.dtype``) and ``seed`` that it takes (by name, or all of them through
    ``**kwargs``), the run's value. Its parameters must have the run's dtype. A resumed run calls the factory again
    with the same options, so it must build the same parameter names and shapes every time. Names are unique across
    dpnet and every installed plugin (``registry.get_model(name)``, ``registry.available("model")``).
    """
