"""The growth policy of a PEER pool: when to grow, whom to freeze, how much room to keep.

:class:`GrowthPolicy` is a frozen dataclass of rules; :class:`GrowthEvent` records each
decision. :class:`~peer_ll.strategies.growth.PEERGrowth` applies them to its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_bool, check_choice, check_int
from peer_ll.strategies.novelty import GrowthDecision

WHEN = ("always", "new_classes", "new_tasks", "new_classes_or_tasks", "never")
FREEZE = ("previous", "none")

FreezeRule = str | Callable[[PEER, object], Iterable[int]]
# a callable gets (the PEERGrowth that applies the policy, the experience)
WhenRule = str | Callable[[object, object], "GrowthDecision | bool"]


@dataclass(frozen=True)
class GrowthPolicy:
    """What a PEER layer does when an experience arrives for training.

    Args:
        num_keys: sub-keys per side of each new segment, so a growth adds
            ``num_keys**2`` experts (default: the layer's own ``num_keys``).
        when: grow on "always" (every experience not yet an owner), "new_classes"
            (the experience brings a class not seen in training before), "new_tasks"
            (a task label not seen before), "new_classes_or_tasks", "never", or a
            callable ``(growth, experience) -> GrowthDecision | bool`` such as
            :class:`~peer_ll.strategies.NoveltyTrigger` (task-free growth). "always"
            refuses online mini-experiences (``OnlineCLExperience``): it would grow
            once per mini-batch; use a callable there.
        freeze: owners to freeze after a growth: "previous" (every owner but the
            new one), "none", or a callable ``(layer, experience) -> owner ids``.
        freeze_keys: also freeze the frozen owners' sub-keys.
        freeze_query: also freeze the query network after a growth.
        max_experts: largest pool size; a growth that would pass it is skipped.
            :func:`attach_growth` reserves this room up front, so growth never
            replaces a Parameter and optimizer state survives any strategy.

    With a string ``when``, new experts are owned by the experience's id
    (``current_experience``), and an experience whose id already owns experts (e.g.
    the first one, which owns the layer's initial segment when ``owner=0``) never
    grows the pool again. With a callable ``when``, the policy numbers owners itself
    (:meth:`next_owner`: one more than the largest so far), since task-free
    experiences say nothing about owners.

    ``freeze="previous"`` freezes only owners whose experts have changed since they
    were created: a strategy that re-initialises the model each experience (GDumb)
    leaves segments that never trained free.
    """

    num_keys: int | None = None
    when: WhenRule = "always"
    freeze: FreezeRule = "previous"
    freeze_keys: bool = True
    freeze_query: bool = False
    max_experts: int | None = None

    def __post_init__(self) -> None:
        if self.num_keys is not None:
            check_int("num_keys", self.num_keys, minimum=1)
        if not callable(self.when):
            check_choice("when", self.when, WHEN)
        if not callable(self.freeze):
            check_choice("freeze", self.freeze, FREEZE)
        check_bool("freeze_keys", self.freeze_keys)
        check_bool("freeze_query", self.freeze_query)
        if self.max_experts is not None:
            check_int("max_experts", self.max_experts, minimum=1)

    def keys_per_growth(self, layer: PEER) -> int:
        """Sub-keys per side that one growth of ``layer`` adds."""
        return layer.num_keys if self.num_keys is None else self.num_keys

    def next_owner(self, layer: PEER) -> int:
        """The owner id of the next growth of ``layer`` under a callable ``when``."""
        return int(layer.segment_owner.max()) + 1 if layer.num_segments else 0

    def reservation(self, layer: PEER) -> tuple[int, int]:
        """(capacity, key_capacity) that holds every growth ``max_experts`` allows.

        Without ``max_experts`` this is the layer's current room.
        """
        if self.max_experts is None:
            return layer.capacity, layer.key_capacity
        n = self.keys_per_growth(layer)
        growths = max(0, (self.max_experts - layer.num_experts) // (n * n))
        return (
            max(layer.capacity, layer.num_experts + growths * n * n),
            max(layer.key_capacity, layer.num_sub_keys + growths * n),
        )


class GrowthEvent(NamedTuple):
    """One decision of a :class:`PEERGrowth`: ``grew`` and why, and the pool size after.

    ``signal`` is the value a callable ``when`` decided on (None for string rules) and
    ``owner`` the new segment's owner id (None without growth).
    """

    experience: int
    grew: bool
    reason: str
    num_experts: int
    signal: float | None = None
    owner: int | None = None


def fingerprint(layer: PEER, owner: int) -> float:
    """A number that changes when any expert row of ``owner`` changes."""
    rows = (layer.pool.expert_owner == owner).nonzero().flatten()
    down, up = layer.down[rows].detach().double(), layer.up[rows].detach().double()
    weight = torch.arange(1, down.shape[1] + 1, dtype=torch.float64, device=down.device)
    return float((down * weight).sum() + up.sum() * 0.5 + up.pow(2).sum())


def refuse_online(when: str, experience) -> None:
    """Raises for ``when="always"`` on an online mini-experience."""
    from avalanche.benchmarks.scenarios.online import OnlineCLExperience

    if when == "always" and isinstance(experience, OnlineCLExperience):
        raise ValueError(
            "GrowthPolicy(when='always') grows once per experience, got an online "
            "mini-experience (OnlineCLExperience): it would grow once per mini-batch. Use "
            "GrowthPolicy(when=peer_ll.strategies.NoveltyTrigger(...)) for task-free "
            "growth, or when='new_classes' / 'never'"
        )
