"""Dense expert gradients for Avalanche plugins and optimizers that need them.

A PEER layer gives its expert tables row-sparse (COO) gradients by default. Most
Avalanche strategies accept them with ``peer_ll.optim.make_optimizer``: Naive, LwF,
Replay, Cumulative, JointTraining, and EWC and SI (whose ``pow(2)`` and ``flatten``
work on sparse tensors). Some plugins reshape ``p.grad`` (``.view(-1)``), which sparse
tensors do not support: GEM, A-GEM, GSS-greedy, MIR and RWalk. Stock ``torch.optim``
optimizers other than plain SGD reject sparse gradients.

:class:`DenseExpertGrads` switches every PEER layer of the strategy's model to dense
gradients (``layer.sparse_grad = False``) for the whole ``train`` call, covering the
plugins' own backward passes too, and restores the setting afterwards. The
peer_ll factories add it by themselves when :func:`needs_dense_grads` says so.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import (
    AGEMPlugin,
    GEMPlugin,
    GSS_greedyPlugin,
    MIRPlugin,
    RWalkPlugin,
)

from peer_ll.experts import peer_layers
from peer_ll.optim import SparseAdamW

#: Plugins that read ``p.grad`` with dense-only operations.
DENSE_GRAD_PLUGINS: tuple[type, ...] = (
    GEMPlugin,
    AGEMPlugin,
    GSS_greedyPlugin,
    MIRPlugin,
    RWalkPlugin,
)


class DenseExpertGrads(SupervisedPlugin):
    """Gives every PEER layer dense gradients while the strategy trains.

    Dense gradients cost O(capacity) per step instead of O(rows retrieved). Frozen
    rows still get zero gradient, and ``peer_ll.optim.make_optimizer`` still leaves
    them untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: list[tuple[object, bool]] = []

    def before_training(self, strategy, **kwargs) -> None:
        self._saved = [(layer, layer.sparse_grad) for layer in peer_layers(strategy.model).values()]
        for layer, _ in self._saved:
            layer.sparse_grad = False

    def before_training_exp(self, strategy, **kwargs) -> None:
        # Layers the model gained since before_training (a user's own adaptation).
        known = {id(layer) for layer, _ in self._saved}
        for layer in peer_layers(strategy.model).values():
            if id(layer) not in known:
                self._saved.append((layer, layer.sparse_grad))
                layer.sparse_grad = False

    def after_training(self, strategy, **kwargs) -> None:
        for layer, sparse in self._saved:
            layer.sparse_grad = sparse
        self._saved = []


def sparse_aware(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` accepts row-sparse gradients on the expert tables."""
    if isinstance(optimizer, SparseAdamW | torch.optim.SparseAdam):
        return True
    if type(optimizer) is torch.optim.SGD:  # sparse is fine without weight decay
        return all(not group.get("weight_decay") for group in optimizer.param_groups)
    return False


def needs_dense_grads(plugins: Iterable[object], optimizer: torch.optim.Optimizer) -> bool:
    """Whether a strategy with these ``plugins`` and ``optimizer`` needs dense gradients."""
    return not sparse_aware(optimizer) or any(isinstance(p, DENSE_GRAD_PLUGINS) for p in plugins)
