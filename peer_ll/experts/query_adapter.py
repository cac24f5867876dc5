"""Per-owner query adapters: an optional query transform for a PEER layer (not in the paper).

A PEER layer with an attached query adapter (``layer.attach_query_adapter(module)``)
scores owner o's sub-keys with ``module(q, o)`` instead of ``q``. Without one, the
layer is the paper's and pays nothing. A :class:`~peer_ll.experts.per_owner.PerOwner` of
:class:`QueryAdapter` (``unknown="identity"``) gives every owner a small residual on the
shared query, used only for that owner's own sub-keys::

    q_o = q ⊙ (1 + γ_o) + β_o + (q A_o) B_o        per head; A_o (d, r), B_o (r, d)

``B_o``, ``γ_o`` and ``β_o`` start at zero, so a new adapter changes nothing until it
trains; unknown owners get the identity. Freezing an owner's sub-keys with
``PEER.freeze`` freezes its adapter, so retrieval restricted to an old owner stays
bit-identical while a new owner trains its adapter on a frozen query network. With
``PerOwner(..., unknown="first")`` and one copy, every owner gets the first owner's
adapter: one query and one search over the pool, as without an adapter.
Axis letters: ``H`` heads, ``d`` dim_key, ``r`` rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peer_ll.experts.checks import check_type
from peer_ll.kernels.product_topk import product_topk
from peer_ll.kernels.selected_scores import selected_scores


class QueryAdapter(nn.Module):
    """Identity-at-init residual on queries: (..., H, d) -> (..., H, d).

    Args:
        heads: number of heads H.
        dim_key: query size d.
        rank: rank r of the low-rank residual (0: none).
        affine: add a per-dimension scale and shift.
    """

    def __init__(self, heads: int, dim_key: int, *, rank: int, affine: bool) -> None:
        super().__init__()
        self.rank, self.affine = rank, affine
        if rank:
            self.down = nn.Parameter(torch.randn(heads, dim_key, rank) / math.sqrt(dim_key))
            self.up = nn.Parameter(torch.zeros(heads, rank, dim_key))
        if affine:
            self.scale = nn.Parameter(torch.zeros(heads, dim_key))
            self.shift = nn.Parameter(torch.zeros(heads, dim_key))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = q * (1 + self.scale) + self.shift if self.affine else q
        if self.rank:
            low = torch.einsum("...hd,hdr->...hr", q, self.down)
            out = out + torch.einsum("...hr,hrd->...hd", low, self.up)
        return out


def adapted_topk(adapter, q, pool, segments, mask, k, backend):
    """Exact top-k where owner o's segments are searched with ``adapter(q, o)``.

    q (T, H, d), segments (S', 4), mask (T, S') or None -> scores, ids (T, H, k).
    An adapter whose ``owner_independent`` is True is applied once: one search.
    """
    if getattr(adapter, "owner_independent", False):
        return product_topk(
            adapter(q, None), pool.sub_keys, segments, k, segment_mask=mask, backend=backend
        )
    seg_owner = pool.expert_owner[segments[:, 3]]
    scores, ids = [], []
    for owner in seg_owner.unique().tolist():  # a loop over owners, not tokens
        keep = seg_owner == owner
        s, i = product_topk(
            adapter(q, owner),
            pool.sub_keys,
            segments[keep],
            k,
            segment_mask=None if mask is None else mask[:, keep],
            backend=backend,
        )
        scores.append(s)
        ids.append(i)
    scores, pick = torch.cat(scores, dim=-1).topk(k, dim=-1)
    return scores, torch.cat(ids, dim=-1).gather(-1, pick)


def adapted_scores(adapter, q, ids, pool, backend):
    """Differentiable scores (T, H, K) of ``ids``, each with its owner's adapted query."""
    left, right = pool.key_rows(ids)
    if getattr(adapter, "owner_independent", False):
        return selected_scores(
            adapter(q, None), pool.sub_keys, left, right, frozen=pool.key_frozen, backend=backend
        )
    owner_of = pool.expert_owner[ids.clamp(min=0)]
    out = None
    for owner in owner_of.unique().tolist():
        s = selected_scores(
            adapter(q, owner), pool.sub_keys, left, right, frozen=pool.key_frozen, backend=backend
        )
        out = s if out is None else torch.where(owner_of == owner, s, out)
    return out


def sync_adapter(adapter: object, pool) -> None:
    """An owner's adapter trains exactly when some of its sub-keys do.

    Acts on a :class:`~peer_ll.experts.per_owner.PerOwner` adapter; other modules are
    left to whoever attached them.
    """
    freeze, known = getattr(adapter, "freeze", None), getattr(adapter, "owners", None)
    if freeze is None or known is None:
        return
    for owner in set(pool.segment_owner.tolist()) & set(known):
        rows = pool.segments[pool.segment_owner == owner][:, 0]
        freeze([owner], frozen=bool(pool.key_frozen[rows].all()))


def attach_adapter(layer: nn.Module, module: nn.Module) -> nn.Module:
    """``module`` on the layer's device and dtype, synced to its pool, for ``layer.query_adapter``.

    Raises:
        TypeError / ValueError: ``module`` is not a Module, or one is attached already.
    """
    check_type("module", module, nn.Module)
    if layer.query_adapter is not None:
        raise ValueError(
            "query_adapter must be unset to attach one, got "
            f"{type(layer.query_adapter).__name__} already attached"
        )
    weight = layer.to_query.weight
    module = module.to(device=weight.device, dtype=weight.dtype)
    sync_adapter(module, layer.pool)
    return module
