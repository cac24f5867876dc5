"""Per-owner low-rank deltas on a projection (e.g. attention's), routed like the experts.

``OwnerLowRank(base)`` computes ``base(x) + (x A_o) B_o`` for owner o's inputs, where
owner o got ``A_o`` (D × r) and ``B_o`` (r × E) from :meth:`OwnerLowRank.add_owner`;
``B_o`` starts at zero, so adding an owner changes nothing. Inputs of an owner
without a delta (the base owner among them), and ``owners=None``, get ``base(x)``
exactly. Owners arrive as an argument or through
:func:`~peer_ll.adapters.branch.owners_scope`, as for :class:`ExpertBranch`.

Axis letters: ``D`` input width, ``E`` output width, ``r`` rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from peer_ll.adapters.branch import Owners, scoped_owners
from peer_ll.experts.checks import check_int, check_owner


class OwnerLowRank(nn.Module):
    """A projection plus one low-rank delta per owner.

    Args:
        base: the projection, (..., D) -> (..., E).
        dim: D.
        dim_out: E.

    Shapes:
        x (..., D) -> (..., E).
    """

    takes_owners = True

    def __init__(self, base: nn.Module, dim: int, dim_out: int) -> None:
        super().__init__()
        self.base = base
        self.dim, self.dim_out = (
            check_int("dim", dim, minimum=1),
            check_int("dim_out", dim_out, minimum=1),
        )
        self.down = nn.ParameterDict()  # owner -> (D, r)
        self.up = nn.ParameterDict()  # owner -> (r, E), zero at first

    @property
    def owners(self) -> list[int]:
        return sorted(int(o) for o in self.down)

    def add_owner(self, owner: int, rank: int) -> None:
        """Give ``owner`` a rank-``rank`` delta that starts at zero; freeze the others'."""
        owner, rank = check_owner("owner", owner), check_int("rank", rank, minimum=1)
        if str(owner) in self.down:
            raise ValueError(f"owner must be new, got {owner} (present: {self.owners})")
        ref = next(self.base.parameters(), None)
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        for p in (*self.down.values(), *self.up.values()):
            p.requires_grad_(False)
        down = torch.randn(self.dim, rank, **kw) / math.sqrt(self.dim)
        self.down[str(owner)] = nn.Parameter(down)
        self.up[str(owner)] = nn.Parameter(torch.zeros(rank, self.dim_out, **kw))

    def delta(self, x: torch.Tensor, owner: int) -> torch.Tensor:
        """Owner's delta: (..., D) -> (..., E)."""
        return (x @ self.down[str(owner)]) @ self.up[str(owner)]

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """``base(x)`` plus the delta of each input's owner (None: the enclosing scope's)."""
        if owners is None:
            owners = scoped_owners()
        if isinstance(owners, str | bool | float):
            raise TypeError(
                f"owners must be None, an owner id, a sequence of owner ids or an "
                f"int tensor, got {owners!r}"
            )
        out = self.base(x)
        if owners is None:
            return out
        if isinstance(owners, torch.Tensor) and owners.dim() > 0:
            lead = tuple(x.shape[:-1])
            owners = owners.to(x.device)
            owners = owners.reshape(*owners.shape, *[1] * (len(lead) - owners.dim())).expand(lead)
            for o in self.owners:
                mask = owners == o
                if bool(mask.any()):
                    out = out.index_put((mask,), out[mask] + self.delta(x[mask], o))
            return out
        group = [owners] if not isinstance(owners, Sequence) else list(owners)
        for o in {check_owner("owners", o) for o in group} & set(self.owners):
            out = out + self.delta(x, o)
        return out
