"""Per-owner routing pieces of a PEER layer: query adapters, statistics recording.

:class:`OwnerRoutingMixin` gives :class:`~peer_ll.experts.PEER` its owner-aware parts:
which owner's query statistics a forward updates, which owners an eval-mode forward
searches by default, and per-owner query adapters, the plasticity that leaves old
routing intact.

With ``query_adapter_rank > 0`` (and/or ``query_adapter_affine=True``) every owner gets
a small residual on the shared query, used only to score that owner's own sub-keys::

    q_o = q ⊙ (1 + γ_o) + β_o + (q A_o) B_o        per head; A_o (d, r), B_o (r, d)

``B_o``, ``γ_o`` and ``β_o`` start at zero, so a new adapter changes nothing until it
trains. Freezing an owner's keys freezes its adapter, so owner-restricted retrieval of
an old owner stays bit-identical while a new owner trains its adapter, its keys and its
experts on a frozen query network. ``γ_o``/``β_o`` are a learnable per-owner
renormalisation of the query (per-owner BatchNorm *running* statistics are not
implemented).

The adapter acts on the query, not on the input x, so pseudo-queries sampled from
:class:`~peer_ll.experts.owner_stats.OwnerQueryStats` pass through it: the key-margin
loss (:func:`peer_ll.experts.protection.key_margin_loss`) sees exactly the queries that
retrieval would score. Axis letters as in :mod:`peer_ll.experts.peer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peer_ll.experts.checks import check_owner
from peer_ll.experts.pool import ExpertPool
from peer_ll.kernels.product_topk import product_topk


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


class OwnerRoutingMixin:
    """PEER mixin (before ExpertPool in the MRO): owners, statistics and adapters."""

    query_adapters: nn.ModuleDict

    # ------------------------------------------------------------------- owners
    def _resolve_owners(self, owners):
        if owners is None and not self.training:
            return self.eval_owners
        return owners

    def stats_owner(self) -> int | None:
        """The owner whose query statistics a forward now updates, or None."""
        if self.recording_owner is not None:
            return self.recording_owner
        if not self.training or self.training_owner is None:
            return None
        if self.training_owner != "newest":
            return check_owner("training_owner", self.training_owner)
        if bool(self.expert_frozen[self.segments[-1, 3]]):
            return None
        return int(self.segment_owner[-1])

    def _record_query_stats(self, q: torch.Tensor, owners) -> None:
        owner = None if self.query_stats is None else self.stats_owner()
        if owner is None:
            return
        q = q.detach()
        if isinstance(owners, torch.Tensor) and owners.dim() > 0:  # per-input owners
            q = q[owners.reshape(-1).to(q.device) == owner]
        self.query_stats.update(owner, q)

    # ----------------------------------------------------- pool hooks (cooperative)
    def grow(self, num_keys: int, *, owner: int, num_keys_right: int | None = None) -> torch.Tensor:
        ids = super().grow(num_keys, owner=owner, num_keys_right=num_keys_right)
        self._add_adapter(check_owner("owner", owner))
        return ids

    grow.__doc__ = ExpertPool.grow.__doc__

    def _set_frozen(self, owners, value: bool, keys: bool, query: bool) -> None:
        super()._set_frozen(owners, value, keys, query)
        self._sync_adapter_freezing()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_adapters(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_adapter_freezing()

    # ----------------------------------------------------------------- adapters
    def _init_adapters(self, rank: int, affine: bool) -> None:
        self.query_adapter_rank, self.query_adapter_affine = rank, affine
        self.query_adapters = nn.ModuleDict()

    @property
    def uses_query_adapters(self) -> bool:
        return bool(self.query_adapter_rank or self.query_adapter_affine)

    def _add_adapter(self, owner: int) -> None:
        if not self.uses_query_adapters or str(owner) in self.query_adapters:
            return
        adapter = QueryAdapter(self.heads, self.dim_key, rank=self.query_adapter_rank,
                               affine=self.query_adapter_affine)
        weight = self.to_query.weight
        self.query_adapters[str(owner)] = adapter.to(device=weight.device, dtype=weight.dtype)

    def owner_query(self, q: torch.Tensor, owner: int) -> torch.Tensor:
        """The query that scores ``owner``'s sub-keys: (..., H, d) -> (..., H, d)."""
        adapter = self.query_adapters[str(owner)] if str(owner) in self.query_adapters else None
        return q if adapter is None else adapter(q)

    def _segment_owners(self, segments: torch.Tensor) -> torch.Tensor:
        """(S,) owner of each row of a (sub)table of segments."""
        return self.expert_owner[segments[:, 3]]

    def _adapted_search(
        self, q: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k where each owner's segments are searched with that owner's query."""
        seg_owner = self._segment_owners(segments)
        scores, ids = [], []
        for owner in seg_owner.unique().tolist():  # a loop over owners, not tokens
            keep = seg_owner == owner
            sub_mask = None if mask is None else mask[:, keep]
            s, i = product_topk(self.owner_query(q, owner), self.sub_keys, segments[keep], k,
                                segment_mask=sub_mask, backend=self.backend)
            scores.append(s)
            ids.append(i)
        scores, pick = torch.cat(scores, dim=-1).topk(k, dim=-1)
        return scores, torch.cat(ids, dim=-1).gather(-1, pick)

    def _owner_scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Differentiable scores (T, H, K) of ``ids``, each with its owner's query."""
        if not len(self.query_adapters):
            return self.selected_scores(q, ids)
        owner_of = self.expert_owner[ids.clamp(min=0)]
        out = None
        for owner in owner_of.unique().tolist():
            scores = self.selected_scores(self.owner_query(q, owner), ids)
            out = scores if out is None else torch.where(owner_of == owner, scores, out)
        return out

    def _sync_adapter_freezing(self) -> None:
        """An owner's adapter is frozen exactly when all of its segments' keys are."""
        for key, adapter in self.query_adapters.items():
            mine = self.segments[self.segment_owner == int(key)]
            frozen = bool(self.key_frozen[mine[:, 0]].all()) if len(mine) else False
            adapter.requires_grad_(not frozen)

    def _load_adapters(self, state_dict, prefix: str) -> None:
        """Create the adapters a checkpoint holds for owners this layer has not seen."""
        head = prefix + "query_adapters."
        for name in state_dict:
            if name.startswith(head):
                owner = name[len(head):].split(".", 1)[0]
                if owner.isdigit() and owner not in self.query_adapters:
                    if not self.uses_query_adapters:
                        raise ValueError(
                            f"{prefix}: the checkpoint holds query adapters, build the layer "
                            "with the same query_adapter_rank/query_adapter_affine, got none")
                    self._add_adapter(int(owner))
