"""The full method with the PEER pool replaced by a plain per-owner MLP: an ablation.

``peer_protect(protect_classifier(..., owner_encoder=True), inference="input")`` gives
each owner (experience) its own PEER segment, encoder layer, head and query adapter, and
routes each test input to the owner its input statistics pick. :func:`owner_mlp_classifier`
builds the same model with every PEER block's layer (``block.peer``) replaced by a
:class:`~peer_ll.experts.PerOwner` of two-layer MLPs (``dim -> units -> dim``, GELU; the
block keeps its norm and residual) whose parameters equal what
one input activates in the PEER layer (its ``heads · topk`` experts, the query network,
one segment's sub-keys and one query adapter). Trained with the same ``peer_protect``
strategy and the same owner inference, it shows what retrieval over a growing pool adds
beyond owner-wise capacity.
"""

from __future__ import annotations

from torch import nn

from peer_ll.experts import PEER, peer_layers
from peer_ll.experts.per_owner import PerOwner

__all__ = ["owner_mlp_classifier", "peer_active_parameters"]


def peer_active_parameters(layer: PEER) -> int:
    """Parameters one input uses in ``layer``: its experts, query, one segment, one adapter."""
    tables = {id(layer.down), id(layer.up), id(layer.sub_keys)}
    adapter = layer.query_adapter
    skip = tables | {id(p) for p in (adapter.parameters() if adapter is not None else ())}
    shared = sum(p.numel() for p in layer.parameters() if id(p) not in skip)
    experts = layer.heads * layer.topk * (layer.dim + layer.dim_out)
    keys = layer.num_keys * layer.dim_key  # 2 sides x num_keys sub-keys of dim_key / 2
    if isinstance(adapter, PerOwner):
        adapter = next(iter(adapter.copies.values()))
    own = sum(p.numel() for p in adapter.parameters()) if adapter is not None else 0
    return shared + experts + keys + own


def owner_mlp_classifier(
    in_features: int, num_classes: int, *, experiences: int, **protect_kwargs
) -> nn.Module:
    """``protect_classifier(...)`` with each PEER layer replaced by a PerOwner of MLPs.

    Args:
        in_features, num_classes, experiences: as for
            :func:`~peer_ll.protect.factory.protect_classifier`.
        **protect_kwargs: more ``protect_classifier`` arguments (``hidden``, ``num_keys``,
            ``owner_encoder``, ...); the MLP's units match the PEER layer's active
            parameters (:func:`peer_active_parameters`).

    Returns:
        The model, for ``peer_protect`` (same owner inference as the PEER model); it
        has no PEER layers, so nothing grows: each owner gets its own MLP copy.
    """
    from peer_ll.protect.factory import protect_classifier

    model = protect_classifier(in_features, num_classes, experiences=experiences,
                               **protect_kwargs)  # fmt: skip
    layers = list(peer_layers(model).values())
    for block, layer in zip(model.blocks, layers, strict=True):
        units = max(1, round(peer_active_parameters(layer) / (layer.dim + layer.dim_out + 1)))
        mlp = nn.Sequential(nn.Linear(layer.dim, units), nn.GELU(), nn.Linear(units, layer.dim))
        block.peer = PerOwner(mlp, owner=0)  # x + mlp_owner(norm(x)), the block's residual
    return model
