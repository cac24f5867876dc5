"""A PEERLM's domains (owners): growth, freezing, routes; the bodies of its methods.

See :meth:`peer_ll.models.PEERLM.grow`, :meth:`~peer_ll.models.PEERLM.freeze_old` and
:meth:`~peer_ll.models.PEERLM.route`. Axis letters: ``B`` batch, ``T`` positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peer_ll.experts import peer_layers
from peer_ll.experts.checks import check_choice, check_int
from peer_ll.models.transformer import LMConfig, Route, grow_peer


def grow_domain(model: nn.Module, num_keys: int, *, owner: int) -> dict[int, torch.Tensor]:
    """``model.grow``: new experts (and adapters) for domain ``owner`` in every block."""
    check_int("owner", owner, minimum=max(model.owners) + 1)  # a new owner, in training order
    branch = model.config.growth == "branch"
    new = {}
    for i, block in enumerate(model.blocks):
        if block.is_peer:
            new[i] = grow_peer(block.ffn, num_keys, owner=owner)
            layer = block.ffn
        elif branch and model.config.grow_dense_blocks:
            block.grow_dense(model.config, num_keys, owner=owner)
            layer = block.grown
            new[i] = torch.arange(layer.num_experts - num_keys**2, layer.num_experts)
        else:
            continue
        if branch:
            with torch.no_grad():
                layer.up[new[i]] = 0.0
    if branch and model.config.attention_adapter_rank:
        for block in model.blocks:
            block.attn.add_adapter(owner, model.config.attention_adapter_rank)
    return new


def freeze_all_but(model: nn.Module, owner: int) -> None:
    """``model.freeze_old``: only ``owner``'s experts, sub-keys and adapters train."""
    check_choice("owner", owner, model.owners)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in peer_layers(model).values():
        present = set(layer.segment_owner.tolist())
        others = sorted(present - {owner})
        if others:
            layer.freeze(others, keys=True, query=True)
        if owner in present:
            layer.unfreeze(owner, keys=True, query=False)
        layer.freeze([], keys=False, query=True)  # the shared query network
        for p in (layer.down, layer.up, layer.sub_keys):
            p.requires_grad_(True)
    for block in model.blocks:
        if str(owner) in block.attn.adapters:
            block.attn.adapters[str(owner)].requires_grad_(True)


def domain_route(owners: list[int], growth: str, owner: int | None) -> Route:
    """The owner groups an ``owner``'s tokens retrieve from (None: every expert)."""
    if owner is None:
        return None if growth == "pool" else [[o] for o in owners]
    if isinstance(owner, bool) or not isinstance(owner, int):
        raise TypeError(
            f"owners must be None, 'infer', an int or a (B,) integer tensor, "
            f"got {type(owner).__name__} {owner!r}"
        )
    if owner not in owners:
        raise ValueError(
            f"owners must be None, 'infer', one of {owners} or a (B,) "
            f"integer tensor of them, got {owner!r}"
        )
    if growth == "pool":
        return [[o for o in owners if o <= owner]]
    return [[owners[0]]] if owner == owners[0] else [[owners[0]], [owner]]


def per_sequence_logits(
    route_logits: Callable[[torch.Tensor, int], torch.Tensor],
    idx: torch.Tensor,
    owners: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, T, V) where sequence b takes the route of ``owners[b]`` (a (B,) tensor)."""
    if owners.dim() == 0:
        return route_logits(idx, int(owners))
    if owners.is_floating_point() or owners.dtype == torch.bool:
        raise TypeError(f"owners must be an integer tensor, got {_describe(owners)}")
    if owners.shape != idx.shape[:1]:
        raise ValueError(
            f"owners must be an integer tensor of shape ({idx.shape[0]},), got {_describe(owners)}"
        )
    owners = owners.to(idx.device)
    out = None
    for owner in owners.unique().tolist():
        rows = owners == owner
        logits = route_logits(idx[rows], owner)
        if out is None:
            out = logits.new_empty(idx.shape[0], *logits.shape[1:])
        out[rows] = logits
    return out


def check_ids(idx: object, config: LMConfig) -> None:
    """Raise ValueError unless ``idx`` is a (B, T) tensor of token ids that fits ``config``."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
        raise ValueError(f"idx must be an integer tensor (B, T), got {_describe(idx)}")
    T = idx.shape[1]
    if not 1 <= T <= config.block_size:
        raise ValueError(f"idx must have 1 <= T <= {config.block_size}, got T={T}")
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < config.vocab_size:
        raise ValueError(
            f"idx must hold token ids in [0, {config.vocab_size}), got "
            f"values in [{int(idx.min())}, {int(idx.max())}]"
        )


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
