"""Install :class:`~peer_ll.experts.PerOwner` modules in a model.

:func:`with_owner_head`, :func:`with_owner_encoder`, :func:`with_owner_norms` and
:func:`with_query_adapters` each change a model in place and return it. Call them before
building the optimizer. The model passes owners to the installed modules itself
(``peer_ll.experts.call_with_owners``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from peer_ll.experts import PEER, QueryAdapter, peer_layers
from peer_ll.experts.per_owner import PerOwner


def _owner_of(layer: PEER) -> int:
    return int(layer.segment_owner[0])


def _per_owner_linear(old: nn.Linear, owner: int, **options) -> PerOwner:
    new = PerOwner(nn.Linear(old.in_features, old.out_features), owner=owner, **options)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    first = new.copies[str(owner)]
    with torch.no_grad():
        first.weight.copy_(old.weight)
        first.bias.copy_(old.bias) if old.bias is not None else first.bias.zero_()
    return new


def with_owner_head(model: nn.Module) -> nn.Module:
    """Replace ``model.head`` (a ``Linear``) by a :class:`PerOwner` head with class masks.

    The first owner's head starts with the old ``Linear``'s weights; a new owner's head
    is a copy of the newest.

    Args:
        model: e.g. a ``peer_ll.models.PEERClassifier`` with its default ``Linear`` head.

    Returns:
        ``model``, changed in place.
    """
    old = getattr(model, "head", None)
    if type(old) is not nn.Linear:
        raise TypeError(
            f"model.head must be a torch.nn.Linear (e.g. a PEERClassifier's "
            f"default head), got {type(old).__name__}"
        )
    owner = _owner_of(list(peer_layers(model).values())[-1])
    model.head = _per_owner_linear(old, owner, num_classes=old.out_features)
    return model


def with_owner_encoder(model: nn.Module) -> nn.Module:
    """Replace the first ``Linear`` of ``model.encoder`` by a :class:`PerOwner` copy.

    Each owner then trains its own input layer (a copy of the newest), capacity where
    its inputs differ (e.g. a new pixel permutation). Its owners are needed before the
    first PEER layer runs: use it with input-statistics scoring or task labels.

    Returns:
        ``model``, changed in place.
    """
    encoder = getattr(model, "encoder", None)
    linears = [i for i, m in enumerate(encoder or []) if type(m) is nn.Linear]
    if not isinstance(encoder, nn.Sequential) or not linears:
        raise TypeError(
            "model.encoder must be an nn.Sequential holding an nn.Linear "
            f"(e.g. a PEERClassifier), got {type(encoder).__name__}"
        )
    owner = _owner_of(next(iter(peer_layers(model).values())))
    encoder[linears[0]] = _per_owner_linear(encoder[linears[0]], owner)
    return model


def with_owner_norms(model: nn.Module) -> nn.Module:
    """Give every normalisation layer outside the PEER layers per-owner copies.

    Each ``LayerNorm`` / ``BatchNorm*`` / ``GroupNorm`` child outside PEER layers becomes a
    :class:`PerOwner`: per-owner affine parameters, and for BatchNorm per-owner running
    statistics, updated only while that owner trains. Owners are needed before the
    forward, as for :func:`with_owner_encoder`.

    Returns:
        ``model``, changed in place.
    """
    layers = list(peer_layers(model).values())
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    inside = {id(m) for layer in layers for m in layer.modules()}
    targets = [
        (parent, name, child)
        for parent in model.modules()
        if id(parent) not in inside and not isinstance(parent, PerOwner)
        for name, child in parent.named_children()
        if isinstance(child, norms)
    ]
    if not targets:
        raise ValueError("model must hold normalisation layers outside the PEER layers, got none")
    owner = _owner_of(layers[0])
    for parent, name, child in targets:
        setattr(parent, name, PerOwner(child, owner=owner))
    return model


def with_query_adapters(model: nn.Module, *, rank: int = 4, affine: bool = True) -> nn.Module:
    """Attach a per-owner :class:`QueryAdapter` to every PEER layer of ``model``.

    Each owner's sub-keys are then scored with that owner's adapted query
    (:class:`peer_ll.experts.QueryAdapter`, the identity at init); an owner without an
    adapter uses the shared query. New owners get fresh adapters.

    Returns:
        ``model``, changed in place.
    """
    for layer in peer_layers(model).values():
        weight = layer.to_query.weight
        fresh = partial(QueryAdapter, layer.heads, layer.dim_key, rank=rank, affine=affine)
        per_owner = PerOwner(fresh(), owner=_owner_of(layer), new=fresh, unknown="identity")
        layer.attach_query_adapter(per_owner.to(device=weight.device, dtype=weight.dtype))
    return model


__all__ = ["with_owner_encoder", "with_owner_head", "with_owner_norms", "with_query_adapters"]
