"""The modules add_experts wraps, and the branches it wraps them in.

Each targeted feed-forward block becomes ``ExpertBranch(block, PEER(...))``. With
``ExpertsConfig.adapter_rank`` each adapted projection (e.g. attention's) becomes
``ExpertBranch(projection, PerOwner(LowRankDelta(D, E, r)))``: owner o's inputs get
``projection(x) + (x A_o) B_o``, the base owner's ``projection(x)`` exactly; ``B_o``
starts at zero, so a new owner's delta changes nothing.
"""

from __future__ import annotations

import functools

from torch import nn

from peer_ll.adapters.branch import ExpertBranch
from peer_ll.adapters.config import ExpertsConfig
from peer_ll.experts import PEER
from peer_ll.experts.per_owner import PerOwner
from peer_ll.models.transformer import LowRankDelta


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes activations in backward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def projection_widths(block: nn.Module, name: str) -> tuple[int, int]:
    """(input, output) widths of a feed-forward block: its first and last projections."""
    projections = []
    for m in block.modules():
        if isinstance(m, nn.Linear):
            projections.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
            projections.append(tuple(m.weight.shape))  # transformers' Conv1D: (in, out)
    if not projections:
        raise ValueError(f"target_modules must name blocks with Linear layers, got {name!r}")
    return projections[0][0], projections[-1][1]


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


def build_branches(
    model: nn.Module,
    config: ExpertsConfig,
    targets: list[str],
    adapted: list[str],
    *,
    num_keys: int,
    owner: int,
) -> dict[str, ExpertBranch]:
    """The branches for the first domain ``owner``, by module name; ``model`` is unchanged.

    A PEER layer of num_keys² experts beside each block of ``targets``, and with
    ``config.adapter_rank``, low-rank deltas on each projection of ``adapted``; each on
    its module's device and dtype.
    """
    new = {}
    for name in targets:
        block = model.get_submodule(name)
        dim, dim_out = projection_widths(block, name)
        first = next(block.parameters(), None)
        layer = PEER(
            dim,
            dim_out=dim_out,
            num_keys=num_keys,
            heads=config.heads,
            topk=config.topk,
            dim_key=config.dim_key,
            query_norm=config.query_norm,
            activation=config.activation,
            owner=owner,
        )
        layer.sparse_grad = config.sparse_grad
        if first is not None:
            layer = layer.to(device=first.device, dtype=first.dtype)
        new[name] = ExpertBranch(block, layer, base_owner=config.base_owner)
    for name in adapted:
        projection = model.get_submodule(name)
        dim, dim_out = projection_widths(projection, name)
        deltas = low_rank_deltas(dim, dim_out, config.adapter_rank, owner=owner, like=projection)
        new[name] = ExpertBranch(projection, deltas, base_owner=config.base_owner)
    return new
