"""A plain low-rank delta, given per owner (domain) to a projection by a PerOwner.

With ``ExpertsConfig.adapter_rank`` every adapted projection (e.g. attention's)
becomes ``ExpertBranch(projection, PerOwner(LowRank(D, E, r)))``: owner o's inputs
get ``projection(x) + (x A_o) B_o``; the base owner's get ``projection(x)`` exactly.
``B_o`` starts at zero, so a new owner's delta changes nothing.

Axis letters: ``D`` input width, ``E`` output width, ``r`` rank.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from peer_ll.experts.checks import check_int
from peer_ll.experts.per_owner import PerOwner


class LowRank(nn.Module):
    """``x -> (x A) B`` with ``A`` (D, r) random and ``B`` (r, E) zero at first.

    Args:
        dim: D.
        dim_out: E.
        rank: r.

    Shapes:
        x (..., D) -> (..., E).
    """

    def __init__(self, dim: int, dim_out: int, rank: int) -> None:
        super().__init__()
        dim, dim_out = check_int("dim", dim, minimum=1), check_int("dim_out", dim_out, minimum=1)
        rank = check_int("rank", rank, minimum=1)
        self.down = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(rank, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down) @ self.up


def low_rank_deltas(
    dim: int, dim_out: int, rank: int, *, owner: int, like: nn.Module | None = None
) -> PerOwner:
    """A :class:`PerOwner` of :class:`LowRank` deltas whose first owner is ``owner``.

    Args:
        dim, dim_out, rank: each delta's D, E and r.
        owner: the first owner.
        like: a module whose first parameter gives the deltas' device and dtype.
    """
    new = functools.partial(LowRank, dim, dim_out, rank)
    first = new()
    ref = None if like is None else next(like.parameters(), None)
    if ref is not None:
        first = first.to(device=ref.device, dtype=ref.dtype)
    return PerOwner(first, owner=owner, new=new)
