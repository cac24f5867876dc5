"""Growth into one pool in an Avalanche strategy: one retrieval, no task label.

:class:`PoolGrowthPlugin` completes :func:`peer_ll.strategies.attach_growth` (which grows
every PEER layer in ``adaptation``, before the optimizer is updated) with
:class:`peer_ll.strategies.pool_growth.PoolGrowth`:

- ``before_training_exp``: once a layer holds a new segment of the experience, its
  sub-keys are set to k-means centroids of the experience's queries, the new owner gets
  its calibration adapter (the optimizer is then updated by the strategy's own
  ``make_optimizer``), and everything old is frozen: every parameter of the model but the
  PEER tables and the new owner's adapter, old experts and sub-keys, query networks;
- ``before_backward``: the retrieval regulariser joins the loss;
- ``after_training_exp``: the experience's query and input statistics are stored
  (pseudo-queries, or pseudo-inputs with ``pseudo="inputs"``).

With ``PoolGrowthConfig(own_query=True, ...)`` (:data:`OWN_QUERY`, the measured best),
the new owner's own query network trains too.

Evaluation is the paper's layer: one top-k over the whole pool, no owners.
:func:`peer_grow_pool` builds the strategy (the ``peer-grow-pool`` of ``peer-ll run``)
for a model with ``growth="pool"``. Everything old frozen includes the head, so it suits
domain-incremental streams (one fixed head), not class-incremental ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from peer_ll.experts import peer_layers
from peer_ll.experts.checks import check_int, check_type
from peer_ll.strategies.capture import PEERInputs, recompute_query
from peer_ll.strategies.factories import peer_grow
from peer_ll.strategies.pool_growth import OWN_QUERY, PoolGrowth
from peer_ll.strategies.pool_growth_query import OwnQuery


class PoolGrowthPlugin(SupervisedPlugin):
    """One-pool growth for the PEER layers of ``strategy.model`` (see the module docstring).

    Args:
        growth: a :class:`PoolGrowth` (default: its full method).
        query_samples: inputs of an experience used for k-means and statistics.

    Attributes:
        last_loss: the regulariser's value at the last training step (a float).
    """

    def __init__(self, growth: PoolGrowth | None = None, *, query_samples: int = 2048) -> None:
        super().__init__()
        self.growth = PoolGrowth() if growth is None else check_type("growth", growth, PoolGrowth)
        self.query_samples = check_int("query_samples", query_samples, minimum=2)
        self.watch: PEERInputs | None = None
        self.owner: int | None = None
        self.last_loss = 0.0

    def _queries(self, strategy) -> dict:
        """{layer: ((N, H, d) queries, (N, D) inputs)} of up to ``query_samples`` inputs."""
        data = strategy.experience.dataset.eval()
        loader = torch.utils.data.DataLoader(data, batch_size=self.query_samples, shuffle=True)
        x = next(iter(loader))[0].to(strategy.device)
        watch = PEERInputs(strategy.model)
        was_training = strategy.model.training
        strategy.model.eval()
        try:
            with torch.no_grad(), watch.recording():
                strategy.model(x)
            return {
                layer: (recompute_query(layer, xl), xl.reshape(-1, layer.dim))
                for layer, (xl, _) in watch.inputs.items()
            }
        finally:
            watch.remove()
            strategy.model.train(was_training)

    def before_training_exp(self, strategy, **kwargs) -> None:
        t = int(strategy.experience.current_experience)
        layers = list(peer_layers(strategy.model).values())
        self.owner = t
        grown = [
            layer
            for layer in layers
            if layer.num_segments > 1 and int(layer.segment_owner[-1]) == t
        ]
        if grown:
            queries = self._queries(strategy)
            for layer in grown:
                self.growth.init_grown(layer, owner=t, queries=queries[layer][0])
            for p in strategy.model.parameters():
                p.requires_grad_(False)
            for layer in grown:
                old = [o for o in set(layer.segment_owner.tolist()) if o != t]
                layer.freeze(old, keys=True, query=True)
                layer.unfreeze(t, keys=True, query=False)
                for p in (layer.down, layer.up, layer.sub_keys):
                    p.requires_grad_(True)
                if isinstance(layer.query_adapter, OwnQuery):  # the new owner's query trains
                    for p in layer.query_adapter.nets[str(t)].parameters():
                        p.requires_grad_(True)
            strategy.make_optimizer()  # the new adapters join the optimizer
        self.watch = PEERInputs(strategy.model)
        self.watch.active = True

    def before_backward(self, strategy, **kwargs) -> None:
        if self.watch is None or not self.growth.config.regularised:
            return
        total = None
        for layer, (x, _) in self.watch.inputs.items():
            loss = self.growth.loss(layer, recompute_query(layer, x), owner=self.owner)
            total = loss if total is None else total + loss
        if total is not None:
            strategy.loss = strategy.loss + total
            self.last_loss = float(total.detach())

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.watch is not None:
            self.watch.remove()
            self.watch = None
        for layer, (q, x) in self._queries(strategy).items():
            self.growth.record(layer, self.owner, q, inputs=x)


def peer_grow_pool(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    growth: PoolGrowth | None = None,
    query_samples: int = 2048,
    plugins: Iterable[object] = (),
    **kwargs,
):
    """Growth into one pool: :func:`peer_grow` with a :class:`PoolGrowthPlugin` first.

    Args:
        model: a model with PEER layers whose ``growth`` attribute, if it has one, is
            "pool" (e.g. ``peer_classifier(..., head="fixed", growth="pool")``).
        optimizer, criterion: as in :func:`peer_grow`.
        growth: the :class:`PoolGrowth` (default: ``PoolGrowth(OWN_QUERY)``, the
            measured best: own query networks, k-means keys, pseudo-inputs).
        query_samples: inputs per experience for k-means keys and query statistics.
        plugins: more Avalanche plugins (a new list is built).
        **kwargs: :func:`peer_grow`'s (``policy``, ``template``, ``train_mb_size``, ...).

    Returns:
        The strategy; its ``plugins`` hold the :class:`PoolGrowthPlugin`.

    Raises:
        ValueError: ``model.growth`` is not "pool".
    """
    mode = getattr(model, "growth", None)  # a PEER layer's own growth is a module
    if isinstance(mode, str) and mode != "pool":
        raise ValueError(f"model.growth must be 'pool' for peer_grow_pool, got {mode!r}")
    if isinstance(plugins, nn.Module | str) or not isinstance(plugins, Iterable):
        raise TypeError(f"plugins must be an iterable of plugins, got {type(plugins).__name__}")
    growth = PoolGrowth(OWN_QUERY) if growth is None else growth
    plugin = PoolGrowthPlugin(growth, query_samples=query_samples)
    return peer_grow(model, optimizer, criterion, plugins=(plugin, *plugins), **kwargs)
