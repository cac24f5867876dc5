"""Per-owner (per-domain) low-rank deltas on a projection: a PerOwner of LowRankDelta.

With ``ExpertsConfig.adapter_rank`` every adapted projection (e.g. attention's) becomes
``ExpertBranch(projection, PerOwner(LowRankDelta(D, E, r)))``: owner o's inputs
get ``projection(x) + (x A_o) B_o``; the base owner's get ``projection(x)`` exactly.
``B_o`` starts at zero, so a new owner's delta changes nothing.

Axis letters: ``D`` input width, ``E`` output width, ``r`` rank.
"""

from __future__ import annotations

import functools

from torch import nn

from peer_ll.experts.per_owner import PerOwner
from peer_ll.models.transformer import LowRankDelta


def low_rank_deltas(
    dim: int, dim_out: int, rank: int, *, owner: int, like: nn.Module | None = None
) -> PerOwner:
    """A :class:`PerOwner` of :class:`~peer_ll.models.transformer.LowRankDelta` modules
    (``B`` zero at first) whose first owner is ``owner``.

    Args:
        dim, dim_out, rank: each delta's D, E and r.
        owner: the first owner.
        like: a module whose first parameter gives the deltas' device and dtype.
    """
    new = functools.partial(LowRankDelta, dim, dim_out, rank)
    first = new()
    ref = None if like is None else next(like.parameters(), None)
    if ref is not None:
        first = first.to(device=ref.device, dtype=ref.dtype)
    return PerOwner(first, owner=owner, new=new)
