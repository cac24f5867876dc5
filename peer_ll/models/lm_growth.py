"""Growth and freezing of a PEERLM by domain (owner): the bodies of its methods.

See :meth:`peer_ll.models.PEERLM.grow` and :meth:`peer_ll.models.PEERLM.freeze_old`.
"""

from __future__ import annotations

import torch
from torch import nn

from peer_ll.experts import peer_layers
from peer_ll.experts.checks import check_choice, check_int
from peer_ll.models.transformer import grow_peer


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
