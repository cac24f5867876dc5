"""``peer_protect``: grow-and-freeze with routing protection, as one strategy factory.

The full method, without task labels at test time:

1. growth: each experience grows a new PEER segment that it owns; older owners'
   experts and sub-keys are frozen, and after the first experience so is the trunk
   (encoder, norms, PEER query network): every old parameter is frozen;
2. plasticity: the new owner trains its experts, its sub-keys and its copy of every
   :class:`~peer_ll.experts.PerOwner` module (head, query adapters, ...);
3. training forwards are routed to the new owner;
4. at test time an owner scorer routes each input to its likeliest owner: the old
   function is then bit-identical for every input whose owner is scored right.

See :mod:`peer_ll.protect.plugin` and :mod:`peer_ll.protect.routed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from peer_ll.experts.checks import check_bool, check_choice, check_int
from peer_ll.experts.per_owner import per_owner_modules
from peer_ll.protect.builders import (
    with_owner_encoder,
    with_owner_head,
    with_owner_norms,
    with_query_adapters,
)
from peer_ll.protect.gate import OwnerGate
from peer_ll.protect.input_stats import InputOwnerStats
from peer_ll.protect.plugin import OwnerRouting, any_peer_layers
from peer_ll.protect.query_stats import QueryOwnerStats
from peer_ll.protect.routed import OwnerRouted
from peer_ll.strategies.factories import peer_grow
from peer_ll.strategies.growth import GrowthPolicy, attach_growth, growth_modules

INFERENCES = ("likelihood", "soft", "input", "gate", "oracle", "all")
ROUTE_OPTIONS = ("soft", "top", "temperature")


def _protect_policy(model: nn.Module, policy: GrowthPolicy | None) -> GrowthPolicy:
    """The growth policy: the given one, or the model's own with the query frozen too."""
    if policy is None:
        current = growth_modules(model)
        policy = current[0].policy if current else GrowthPolicy()
        policy = replace(policy, freeze_query=True)
    if not isinstance(policy, GrowthPolicy):
        raise TypeError(f"policy must be a GrowthPolicy or None, got {type(policy).__name__}")
    if policy.when != "always" or policy.freeze != "previous" or not policy.freeze_keys:
        raise ValueError(
            "policy must grow on every experience and freeze every previous owner with its "
            "keys (GrowthPolicy(when='always', freeze='previous', freeze_keys=True)), got "
            f"{policy}"
        )
    return policy


def owner_scorer(model: nn.Module, inference: str, options: dict) -> nn.Module | None:
    """The scorer of ``inference`` for ``model`` (None for "oracle" and "all")."""
    if inference in ("likelihood", "soft"):
        return QueryOwnerStats.for_model(model, **options)
    if inference == "input":
        return InputOwnerStats(**options)
    if inference == "gate":
        return OwnerGate(**options)
    if options:
        raise TypeError(
            f"inference_options must be empty for inference={inference!r}, got {options}"
        )
    return None


def peer_protect(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    inference: str = "likelihood",
    inference_options: dict | None = None,
    mem_size: int = 0,
    task_labels: bool | None = None,
    policy: GrowthPolicy | None = None,
    plugins: Iterable[object] = (),
    **template_kwargs,
):
    """Grow-and-freeze with routing protection and owner scoring (or task labels).

    Args:
        model: an owner-aware model with PEER layers, e.g. :func:`protect_classifier`.
        optimizer: default ``peer_ll.optim.make_optimizer`` of the routed model.
        criterion: default ``torch.nn.CrossEntropyLoss()``.
        inference: test-time owners: "likelihood" (query statistics,
            :class:`QueryOwnerStats`), "soft" (the same, mixing the likeliest owners),
            "input" (per-owner low-rank Gaussians of the inputs, :class:`InputOwnerStats`),
            "gate" (:class:`OwnerGate` fit on ``mem_size`` replayed inputs), "oracle" (the
            experience id: task known) or "all" (every expert).
        inference_options: the scorer's arguments, plus ``soft``, ``top`` and
            ``temperature`` of :class:`OwnerRouted`.
        mem_size: replay budget of the "gate" scorer (inputs kept in all).
        task_labels: the owner of a test input is the owner that trained on its task
            label, as multi-head baselines read it (True), never (False), or when the
            training stream holds more than one task label (None: task-incremental
            streams use the label, class- and domain-incremental ones ``inference``).
        policy: growth policy; default: the model's own with ``freeze_query``. It must
            grow on every experience and freeze the previous owners with their keys.
        plugins: extra Avalanche plugins (a new list is built).
        **template_kwargs: as for :func:`peer_ll.strategies.peer_grow` (``template``,
            ``train_mb_size``, ``train_epochs``, ``evaluator``, ...).

    Returns:
        The strategy; ``strategy.model`` is the :class:`OwnerRouted` model, and
        ``protect_plugin(strategy)`` its :class:`OwnerRouting` plugin.
    """
    if isinstance(plugins, nn.Module | str) or not isinstance(plugins, Iterable):
        raise TypeError(f"plugins must be an iterable of plugins, got {type(plugins).__name__}")
    check_choice("inference", inference, INFERENCES)
    check_int("mem_size", mem_size, minimum=0)
    if (inference == "gate") != (mem_size > 0):
        raise ValueError(
            f"mem_size must be > 0 with inference='gate' and 0 otherwise, got "
            f"mem_size={mem_size} with inference={inference!r}"
        )
    if task_labels is not None:
        check_bool("task_labels", task_labels)
    if inference not in ("input", "oracle") and not task_labels and _needs_early_owners(model):
        raise ValueError(
            f"inference must be 'input' or 'oracle' for a model with per-owner "
            f"modules before its PEER layers, got {inference!r}"
        )
    options = dict(inference_options or {})
    route = {k: options.pop(k) for k in ROUTE_OPTIONS if k in options}
    if inference == "soft":
        route["soft"] = True
    policy = _protect_policy(model, policy)
    routed = OwnerRouted(model, owner_scorer(model, inference, options), **route)
    routing = OwnerRouting(oracle=inference == "oracle", mem_size=mem_size, task_labels=task_labels)
    if not any_peer_layers(model):  # an ablation without a pool: nothing grows
        from peer_ll.optim import make_optimizer

        template = template_kwargs.pop("template", SupervisedTemplate)
        return template(
            model=routed,
            optimizer=make_optimizer(routed) if optimizer is None else optimizer,
            criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            plugins=[*plugins, routing],
            **template_kwargs,
        )
    return peer_grow(
        routed, optimizer, criterion, policy=policy, plugins=(*plugins, routing), **template_kwargs
    )


def _needs_early_owners(model: nn.Module) -> bool:
    """Whether ``model`` has PerOwner modules other than its head outside its PEER layers."""
    head = getattr(model, "head", None)
    inside = {id(m) for layer in any_peer_layers(model).values() for m in layer.modules()}
    return any(m is not head and id(m) not in inside for m in per_owner_modules(model))


def protect_classifier(
    in_features: int,
    num_classes: int,
    *,
    experiences: int,
    hidden: int = 128,
    num_keys: int = 16,
    adapter_rank: int = 4,
    owner_encoder: bool = False,
    owner_norms: bool = False,
    **classifier_kwargs,
) -> nn.Module:
    """A ``PEERClassifier`` set up for :func:`peer_protect`.

    A per-owner head with class masks (:func:`with_owner_head`), per-owner query adapters
    (rank ``adapter_rank`` plus affine), ``num_keys²`` experts per experience with room
    reserved for ``experiences`` of them. The full method of ``benchmarks/RESULTS.md``
    (``Protect-Input+Enc``) is
    ``peer_protect(protect_classifier(..., owner_encoder=True), inference="input")``.

    Args:
        in_features: values per input sample.
        num_classes: classes of the stream (per task on a task-incremental stream).
        experiences: experiences to reserve room for.
        hidden: width of the encoder and the PEER block.
        num_keys: sub-keys per side of each experience's segment.
        adapter_rank: rank of the per-owner query adapters.
        owner_encoder: give each owner its own encoder input layer
            (:func:`with_owner_encoder`; needs ``inference="input"`` or "oracle").
        owner_norms: give each owner its own norms outside PEER (:func:`with_owner_norms`;
            same need).
        **classifier_kwargs: more ``PEERClassifier`` arguments (``blocks``, ``peer``).
    """
    from peer_ll.models import PEERClassifier

    peer = {**(classifier_kwargs.pop("peer", None) or {}), "num_keys": num_keys}
    model = PEERClassifier(in_features, num_classes, hidden=hidden, peer=peer, **classifier_kwargs)
    attach_growth(
        model, GrowthPolicy(max_experts=experiences * num_keys * num_keys, freeze_query=True)
    )
    with_owner_head(model)
    with_query_adapters(model, rank=adapter_rank, affine=True)
    if owner_encoder:
        with_owner_encoder(model)
    if owner_norms:
        with_owner_norms(model)
    return model


def protect_plugin(strategy) -> OwnerRouting:
    """The :class:`OwnerRouting` plugin of a ``peer_protect`` strategy."""
    found = [p for p in strategy.plugins if isinstance(p, OwnerRouting)]
    if len(found) != 1:
        raise ValueError(f"strategy must hold exactly one OwnerRouting plugin, got {len(found)}")
    return found[0]
