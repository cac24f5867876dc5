"""Keep optimizer moments when a PEER pool grows past its reserved capacity.

Growth within capacity replaces no Parameter, and Avalanche's ``update_optimizer``
keeps the moments by itself. Past capacity the layer reallocates its tables, and
Avalanche resets the state of every replaced Parameter. :class:`CarryOptimizerState`
holds on to that state just before the model adaptation and, once Avalanche has
updated the optimizer, moves it onto the new tables with
:func:`peer_ll.optim.migrate_state`: old rows keep their moments, new rows start at
zero. The peer_ll factories always include it.
"""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from peer_ll.experts import peer_layers
from peer_ll.optim import migrate_state
from peer_ll.strategies.growth import check_growth, growth_modules

_TABLES = ("down", "up", "sub_keys")


class CarryOptimizerState(SupervisedPlugin):
    """Carries PEER tables' optimizer state across reallocating growth."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[tuple[object, str, object, dict]] = []

    def before_training(self, strategy, **kwargs) -> None:
        check_growth(strategy.model)  # a pool without growth would silently stay fixed
        for growth in growth_modules(strategy.model):
            growth.carries_optimizer_state = True

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Runs right before check_model_and_optimizer (adaptation + update_optimizer).
        state = strategy.optimizer.state
        self._held = [
            (layer, name, getattr(layer, name), state[getattr(layer, name)])
            for layer in peer_layers(strategy.model).values()
            for name in _TABLES
            if getattr(layer, name) in state
        ]

    def before_training_exp(self, strategy, **kwargs) -> None:
        optimizer = strategy.optimizer
        for layer, name, old, saved in self._held:
            new = getattr(layer, name)
            if new is old:
                continue
            if not saved:  # nothing to carry (no step was taken yet)
                layer.replaced_parameters = {}
                continue
            optimizer.state[old] = saved
            layer.replaced_parameters = {name: (old, new)}
            migrate_state(optimizer, layer)
        self._held = []
