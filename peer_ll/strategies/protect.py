"""``peer_protect``: grow-and-freeze with routing protection, as one strategy factory.

The full method of the routing-protection issue, without task labels at test time:

1. growth: each experience grows a new PEER segment that it owns; older owners'
   experts and sub-keys are frozen, and after the first experience so is the
   trunk (encoder, norms, PEER query network): every old parameter is frozen;
2. plasticity: the new owner trains its experts, its sub-keys, its per-owner query
   adapter (build the PEER layers with ``query_adapter_rank``/``query_adapter_affine``)
   and, if the model has one, its head in an
   :class:`~peer_ll.models.owner_head.OwnerHead` (``with_owner_head``);
3. training retrieval is restricted to the new owner, and its query statistics are
   re-collected after its experience;
4. at test time owner inference restricts each input's retrieval (and head) to its
   inferred owner: the old function is then bit-identical for every input whose
   owner is inferred right;
5. optionally a key-margin loss keeps new sub-keys below old scores on pseudo-queries
   from the old owners' statistics (no replay), and with a replay budget a learned
   owner gate replaces the generative inference.

See :mod:`peer_ll.strategies.protect_plugins` and :mod:`peer_ll.strategies.owner_gate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from peer_ll.experts import OwnerInference
from peer_ll.strategies.calibrated_margin import CalibratedMarginInference
from peer_ll.strategies.factories import peer_grow
from peer_ll.strategies.growth import GrowthPolicy, growth_modules
from peer_ll.strategies.owner_gate import GateOwnerInference, ReplayOwnerGate
from peer_ll.strategies.protect_plugins import INFERENCES, KeyMarginProtection, OwnerRouting

PROTECT_INFERENCES = (*INFERENCES, "margin-z", "gate")


def _protect_policy(model: nn.Module, policy: GrowthPolicy | None, freeze_trunk: bool):
    """The growth policy: the given one, or the model's own with the query frozen too."""
    if policy is None:
        current = growth_modules(model)
        policy = current[0].policy if current else GrowthPolicy()
        policy = replace(policy, freeze_query=policy.freeze_query or freeze_trunk)
    if not isinstance(policy, GrowthPolicy):
        raise TypeError(f"policy must be a GrowthPolicy or None, got {type(policy).__name__}")
    if policy.when != "always" or policy.freeze != "previous" or not policy.freeze_keys:
        raise ValueError(
            "policy must grow on every experience and freeze every previous owner with its "
            "keys (GrowthPolicy(when='always', freeze='previous', freeze_keys=True)), got "
            f"{policy}"
        )
    return policy


def peer_protect(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    inference: str | OwnerInference = "likelihood",
    inference_options: dict | None = None,
    mem_size: int = 0,
    key_margin: float = 0.0,
    margin: float = 0.0,
    margin_rank: int | None = None,
    margin_samples: int = 64,
    freeze_trunk: bool = True,
    restrict_training: bool = True,
    policy: GrowthPolicy | None = None,
    plugins: Iterable[object] = (),
    **template_kwargs,
):
    """Grow-and-freeze with routing protection and owner inference (no task labels).

    Args:
        model: a model with PEER layers, e.g. ``with_owner_head(PEERClassifier(...,
            head="fixed", peer={"query_adapter_rank": 4}))``.
        optimizer: default ``peer_ll.optim.make_optimizer(model)``.
        criterion: default ``torch.nn.CrossEntropyLoss()``.
        inference: test-time owners: "likelihood" (query statistics), "margin"
            (key-match confidence), "margin-z" (key match calibrated per owner, see
            :class:`CalibratedMarginInference`), "soft" (likelihood posterior mixing), "input"
            (per-owner low-rank Gaussians of the model's inputs, no replay: see
            :class:`~peer_ll.experts.owner_input.InputOwnerStats`), "gate"
            (an owner classifier fit on ``mem_size`` replayed inputs), "oracle" (the
            experience id: task known), "all" (unrestricted retrieval), or an
            :class:`~peer_ll.experts.OwnerInference`.
        inference_options: options of the inference (``OwnerInference`` or
            ``GateOwnerInference`` arguments, e.g. ``{"soft": True, "top": 2}``; for
            "input": ``InputOwnerStats`` arguments (``rank``, ``components``, ...) and
            ``soft``, ``top``, ``temperature`` of ``InputOwnerStats.attach``).
        mem_size: replay budget of the "gate" inference (inputs kept in all).
        key_margin: weight λ of the key-margin loss (0: off).
        margin, margin_rank, margin_samples: the loss's margin, old-score rank and
            pseudo-queries per old owner (see ``peer_ll.experts.key_margin_loss``).
        freeze_trunk: freeze the parameters no owner owns after the first experience.
        restrict_training: training forwards retrieve only from the training owner.
        policy: growth policy; default: the model's own, with ``freeze_query`` set
            when ``freeze_trunk``. It must grow on every experience and freeze the
            previous owners with their keys.
        plugins: extra Avalanche plugins (a new list is built).
        **template_kwargs: as for :func:`peer_ll.strategies.peer_grow` (``template``,
            ``train_mb_size``, ``train_epochs``, ``evaluator``, ...).

    Returns:
        The strategy. Its :class:`OwnerRouting` plugin (``protect_plugin(strategy)``)
        holds the inferred-owner accuracy of the latest evaluation.
    """
    if isinstance(plugins, nn.Module | str) or not isinstance(plugins, Iterable):
        raise TypeError(f"plugins must be an iterable of plugins, got {type(plugins).__name__}")
    if not isinstance(inference, OwnerInference) and inference not in PROTECT_INFERENCES:
        raise ValueError(
            f"inference must be one of {PROTECT_INFERENCES} or an OwnerInference, got {inference!r}"
        )
    if isinstance(mem_size, bool) or not isinstance(mem_size, int) or mem_size < 0:
        raise ValueError(f"mem_size must be an int >= 0, got {mem_size!r}")
    if (inference == "gate") != (mem_size > 0):
        raise ValueError(
            f"mem_size > 0 goes with inference='gate' (and only with it), got "
            f"inference={inference!r}, mem_size={mem_size}"
        )
    from peer_ll.models.owner_copies import OwnerCopies
    from peer_ll.models.owner_head import OwnerLinear

    if inference not in ("input", "oracle") and any(
        isinstance(m, OwnerLinear | OwnerCopies) for m in model.modules()
    ):
        raise ValueError(
            f"inference must be 'input' or 'oracle' for a model with an OwnerLinear or "
            f"OwnerCopies (their owners are needed before the forward), got {inference!r}"
        )
    options = dict(inference_options or {})
    extra: list[object] = []
    if inference == "gate":
        inference = GateOwnerInference(**options)
        extra.append(ReplayOwnerGate(inference, mem_size=mem_size))
        options = {}
    elif inference == "margin-z":
        inference, options = CalibratedMarginInference(**options), {}
    routing = OwnerRouting(
        inference, freeze_trunk=freeze_trunk, restrict_training=restrict_training, **options
    )
    if key_margin:
        extra.append(
            KeyMarginProtection(
                key_margin, margin=margin, rank=margin_rank, num_samples=margin_samples
            )
        )
    policy = _protect_policy(model, policy, freeze_trunk)
    return peer_grow(
        model,
        optimizer,
        criterion,
        policy=policy,
        plugins=(*plugins, routing, *extra),
        **template_kwargs,
    )


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

    Fixed head turned into an :class:`~peer_ll.models.owner_head.OwnerHead`, per-owner
    query adapters (rank ``adapter_rank`` plus affine), ``num_keys²`` experts per
    experience with room reserved for ``experiences`` of them. The full method of
    ``benchmarks/RESULTS.md`` (``Protect-Input+Enc``) is
    ``peer_protect(protect_classifier(..., owner_encoder=True), inference="input")``.

    Args:
        in_features: values per input sample.
        num_classes: classes of the stream (per task on a task-incremental stream).
        experiences: experiences to reserve room for.
        hidden: width of the encoder and the PEER block.
        num_keys: sub-keys per side of each experience's segment.
        adapter_rank: rank of the per-owner query adapters.
        owner_encoder: give each owner its own copy of the encoder's input layer
            (:func:`~peer_ll.models.owner_head.with_owner_encoder`; needs owners known
            before the forward: ``inference="input"`` or "oracle").
        owner_norms: give each owner its own copies of the normalisation layers outside
            PEER (:func:`~peer_ll.models.owner_copies.with_owner_norms`; same need).
        **classifier_kwargs: more ``PEERClassifier`` arguments (``blocks``, ``peer``).
    """
    from peer_ll.models import PEERClassifier
    from peer_ll.models.owner_copies import with_owner_norms
    from peer_ll.models.owner_head import with_owner_encoder, with_owner_head

    peer = dict(classifier_kwargs.pop("peer", None) or {})
    peer.update(num_keys=num_keys, query_adapter_rank=adapter_rank, query_adapter_affine=True)
    policy = GrowthPolicy(max_experts=experiences * num_keys * num_keys, freeze_query=True)
    model = with_owner_head(PEERClassifier(in_features, num_classes, hidden=hidden,
                                           head="fixed", peer=peer, growth=policy,
                                           **classifier_kwargs))
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
