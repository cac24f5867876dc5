"""Growth of PEER pools per experience, as an Avalanche dynamic module.

Avalanche 0.6 adapts a model by calling ``adaptation(experience)`` on every
:class:`~avalanche.models.DynamicModule` in it (``isinstance``, not duck typing),
then updates the optimizer, and only then runs the plugins' ``before_training_exp``.
A :class:`PEER` layer does not import Avalanche, so :func:`attach_growth` gives each
PEER layer of a model a parameter-free child, ``layer.growth``
(:class:`PEERGrowth`), that grows and freezes its parent as the
:class:`GrowthPolicy` says. Parameter names and the state dict are unchanged, and
every Avalanche strategy, including ones built directly, grows the pool.

Growth within the reserved capacity replaces no Parameter, so Avalanche's own
``update_optimizer`` keeps every Adam moment. :func:`attach_growth` reserves the
room that ``GrowthPolicy(max_experts=...)`` allows up front.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from avalanche.models import DynamicModule
from torch import nn

from peer_ll.experts import PEER, peer_layers
from peer_ll.experts.checks import check_type
from peer_ll.experts.sharded import ShardedPEER
from peer_ll.optim import migrate_state
from peer_ll.strategies.growth_policy import (  # noqa: F401 (re-exported)
    FREEZE,
    WHEN,
    GrowthEvent,
    GrowthPolicy,
    fingerprint,
    refuse_online,
)
from peer_ll.strategies.novelty import GrowthDecision


class PEERGrowth(DynamicModule):
    """Grows and freezes its parent PEER layer in ``adaptation(experience)``.

    It has no parameters or buffers (its seen classes and tasks and its events are
    its state_dict's extra state) and is attached as ``layer.growth`` by
    :func:`attach_growth`. It acts only in training mode: Avalanche also adapts the
    model before evaluating each experience, with the model in eval mode.

    Attributes:
        policy: the :class:`GrowthPolicy`.
        seen_classes, seen_tasks: classes and task labels met in training so far.
        events: every :class:`GrowthEvent`, in order.
        carries_optimizer_state: set by :class:`CarryOptimizerState`; silences the
            warning about growth past capacity.
    """

    def __init__(self, layer: PEER, policy: GrowthPolicy) -> None:
        super().__init__()
        check_type("layer", layer, PEER)
        check_type("policy", policy, GrowthPolicy)
        # A plain attribute, not a submodule: the layer owns this module, not the reverse.
        object.__setattr__(self, "layer", layer)
        self.policy = policy
        self.seen_classes: set[int] = set()
        self.seen_tasks: set[int] = set()
        self.events: list[GrowthEvent] = []
        self.carries_optimizer_state = False
        self.fingerprints: dict[int, float] = {}

    def adaptation(self, experience) -> None:
        """Grow (and freeze) the layer for a training ``experience``; no-op in eval mode."""
        if not self.training:
            return
        layer, policy = self.layer, self.policy
        eid = int(experience.current_experience)
        classes = {int(c) for c in getattr(experience, "classes_in_this_experience", ())}
        tasks = {int(t) for t in getattr(experience, "task_labels", ())}
        if policy.when in ("new_classes", "new_classes_or_tasks") and not hasattr(
            experience, "classes_in_this_experience"
        ):
            raise ValueError(
                f"GrowthPolicy(when={policy.when!r}) needs experiences with "
                f"classes_in_this_experience, got {type(experience).__name__}"
            )
        new_classes, new_tasks = bool(classes - self.seen_classes), bool(tasks - self.seen_tasks)
        self.seen_classes |= classes
        self.seen_tasks |= tasks
        self._note_fingerprints()
        if callable(policy.when):
            self._adapt_task_free(eid, experience)
            return
        refuse_online(policy.when, experience)
        grow, reason = self._decide(eid, new_classes, new_tasks)
        if grow:
            self._grow(eid, experience)
        self.events.append(GrowthEvent(eid, grow, reason, layer.num_experts,
                                       owner=eid if grow else None))  # fmt: skip

    def _adapt_task_free(self, eid: int, experience) -> None:
        layer, policy = self.layer, self.policy
        decision = policy.when(self, experience)
        if not isinstance(decision, GrowthDecision):
            decision = GrowthDecision(bool(decision))
        grow, reason = decision.grow, decision.reason
        n = policy.keys_per_growth(layer)
        if (
            grow
            and policy.max_experts is not None
            and (layer.num_experts + n * n > policy.max_experts)
        ):
            grow, reason = False, f"{reason}; max_experts={policy.max_experts}"
        owner = policy.next_owner(layer) if grow else None
        if grow:
            self._grow(owner, experience)
        self.events.append(
            GrowthEvent(eid, grow, reason, layer.num_experts, decision.signal, owner)
        )

    def _note_fingerprints(self) -> None:
        """Records each owner's expert fingerprint the first time it is seen."""
        for owner in set(self.layer.segment_owner.tolist()) - set(self.fingerprints):
            self.fingerprints[owner] = fingerprint(self.layer, owner)

    def trained_owners(self) -> set[int]:
        """Owners whose experts changed since this module first saw them."""
        owners = sorted(self.fingerprints)
        changed = [int(fingerprint(self.layer, o) != self.fingerprints[o]) for o in owners]
        changed = torch.tensor(changed, dtype=torch.long, device=self.layer.down.device)
        if isinstance(self.layer, ShardedPEER):  # a change in any rank's column block counts
            dist.all_reduce(changed, op=dist.ReduceOp.MAX, group=self.layer.group)
        return {o for o, c in zip(owners, changed.tolist(), strict=True) if c}

    def _decide(self, eid: int, new_classes: bool, new_tasks: bool) -> tuple[bool, str]:
        layer, policy = self.layer, self.policy
        if eid in set(layer.segment_owner.tolist()):
            return False, "experience already owns experts"
        wanted = {
            "always": True,
            "new_classes": new_classes,
            "new_tasks": new_tasks,
            "new_classes_or_tasks": new_classes or new_tasks,
            "never": False,
        }[policy.when]
        if not wanted:
            return False, f"when={policy.when!r}"
        n = policy.keys_per_growth(layer)
        if policy.max_experts is not None and layer.num_experts + n * n > policy.max_experts:
            return False, f"max_experts={policy.max_experts}"
        return True, f"when={policy.when!r}"

    def _grow(self, eid: int, experience) -> None:
        layer, policy = self.layer, self.policy
        capacity, key_capacity = layer.capacity, layer.key_capacity
        trained = self.trained_owners()
        layer.grow(policy.keys_per_growth(layer), owner=eid)
        self._note_fingerprints()
        if (layer.capacity, layer.key_capacity) != (capacity, key_capacity) and not (
            self.carries_optimizer_state
        ):
            warnings.warn(
                f"PEER layer grew past its capacity ({capacity} experts) and replaced its "
                "Parameters: Avalanche resets their optimizer state. Reserve room with "
                "GrowthPolicy(max_experts=...) or add peer_ll.strategies.CarryOptimizerState().",
                stacklevel=2,
            )
        if policy.freeze == "none":
            return
        if policy.freeze == "previous":
            owners = sorted((set(layer.segment_owner.tolist()) - {eid}) & trained)
        else:
            owners = sorted({int(o) for o in policy.freeze(layer, experience)})
        if owners:
            layer.freeze(owners, keys=policy.freeze_keys, query=policy.freeze_query)
        elif policy.freeze_query:
            layer.freeze([], keys=False, query=True)

    # --------------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        """What decides the next growth (in the state_dict as ``..growth._extra_state``)."""
        return {
            "seen_classes": sorted(self.seen_classes),
            "seen_tasks": sorted(self.seen_tasks),
            "events": [list(e) for e in self.events],
            "fingerprints": {str(o): f for o, f in self.fingerprints.items()},
        }

    def set_extra_state(self, state: dict) -> None:
        """Restore :meth:`get_extra_state`'s dict; a malformed one raises ValueError."""
        if not isinstance(state, dict) or not {"seen_classes", "seen_tasks"} <= set(state):
            raise ValueError(
                f"growth state must be a dict with seen_classes and seen_tasks, got {state!r}"[:200]
            )
        seen = {}
        for name in ("seen_classes", "seen_tasks"):
            values = state[name]
            if not isinstance(values, list | tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
            ):
                raise ValueError(
                    f"growth state {name} must be a list of ints >= 0, got {values!r}"[:200]
                )
            seen[name] = set(values)
        events = [
            GrowthEvent(int(e[0]), bool(e[1]), str(e[2]), int(e[3]), *e[4:6])
            for e in state.get("events", [])
        ]
        prints = state.get("fingerprints", {})  # which owners have trained (freeze="previous")
        if not isinstance(prints, dict):
            raise ValueError(f"growth state fingerprints must be a dict, got {prints!r}"[:200])
        self.seen_classes, self.seen_tasks, self.events = (
            seen["seen_classes"],
            seen["seen_tasks"],
            events,
        )
        self.fingerprints = {int(o): float(f) for o, f in prints.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # older files
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"policy={self.policy}"


def attach_growth(
    model: nn.Module,
    policy: GrowthPolicy | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[PEERGrowth]:
    """Make every PEER layer in ``model`` grow per ``policy`` in any Avalanche strategy.

    Adds (or re-targets) ``layer.growth`` on each layer and reserves the room that
    ``policy.max_experts`` allows. Call it before building the optimizer; if an
    ``optimizer`` already exists and the reservation reallocates, its state is
    carried over with :func:`peer_ll.optim.migrate_state`.

    Args:
        model: a module containing at least one :class:`PEER` layer.
        policy: the growth policy (default: ``GrowthPolicy()``).
        optimizer: an optimizer already holding the model's parameters, if any.

    Returns:
        The :class:`PEERGrowth` modules, one per layer, in module order.
    """
    policy = GrowthPolicy() if policy is None else policy
    check_type("policy", policy, GrowthPolicy)
    layers = list(peer_layers(model).values())
    for layer in layers:
        current = getattr(layer, "growth", None)
        if current is not None and not isinstance(current, PEERGrowth):
            raise ValueError(
                f"layer.growth must be None or a PEERGrowth, got a {type(current).__name__}"
            )
    growths = []
    for layer in layers:
        capacity, key_capacity = policy.reservation(layer)
        if (capacity, key_capacity) != (layer.capacity, layer.key_capacity):
            layer.reserve(capacity, key_capacity)
            if optimizer is not None:
                migrate_state(optimizer, layer)
            else:  # no optimizer holds the old tables yet: nothing to carry
                layer.replaced_parameters = {}
        growth = layer._modules.get("growth")
        if growth is None:
            growth = PEERGrowth(layer, policy)
            layer.add_module("growth", growth)
        growth.policy = policy
        growths.append(growth)
    return growths


def growth_modules(model: nn.Module) -> list[PEERGrowth]:
    """The :class:`PEERGrowth` modules in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, PEERGrowth)]


def check_growth(model: nn.Module) -> None:
    """Raise a ValueError that says what to do if a PEER layer of ``model`` cannot grow.

    A PEER layer grows in an Avalanche strategy only through its ``growth`` child
    (:func:`attach_growth`); without it, training silently keeps the pool fixed.
    """
    bare = [
        name or "<model>"
        for name, layer in peer_layers(model).items()
        if not isinstance(layer._modules.get("growth"), PEERGrowth)
    ]
    if bare:
        raise ValueError(
            f"model's PEER layers must have growth attached, got none on {bare}: call "
            "peer_ll.strategies.attach_growth(model, GrowthPolicy(...)) before building the "
            "strategy (GrowthPolicy(when='never') for a fixed pool), or build it with "
            "peer_ll.strategies.peer_grow"
        )
