"""Per-owner copies of any trunk module, e.g. per-owner normalisation (and its statistics).

:class:`OwnerCopies` holds one copy of a module per owner. A new owner's copy starts
as the newest one and trains while older copies are frozen, so an old owner's
function stays bit-identical under its own route. With a normalisation layer this
is the issue's "per-owner normalisation statistics": each owner has its own
LayerNorm affine parameters, or its own BatchNorm parameters *and running
statistics*, updated only while that owner trains.

The owner of each input must be known before the forward (like
:class:`~peer_ll.models.owner_head.OwnerLinear`): in eval mode it is the ``follow``
PEER layer's ``eval_owners`` (an owner, or one per sample as set by
:meth:`peer_ll.experts.InputOwnerStats.attach`, or an oracle).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_owner
from peer_ll.models.owner_head import (
    apply_per_owner,
    eval_owners_or_newest,
    freeze_per_owner,
    refuse_query_inference,
)


class OwnerCopies(nn.Module):
    """One copy of ``module`` per owner; (B, ...) -> (B, ...), picked per sample.

    Args:
        module: the first owner's copy (used as is).
        owner: the first owner.
        follow: the PEER layer whose ``eval_owners`` pick copies in eval mode.

    Buffers:
        ``owner_ids`` (O,) int64, in order of addition.
    """

    def __init__(self, module: nn.Module, *, owner: int = 0, follow: PEER | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        if follow is not None and not isinstance(follow, PEER):
            raise TypeError(f"follow: expected a PEER layer or None, got {type(follow).__name__}")
        self.copies = nn.ModuleDict({str(check_owner("owner", owner)): module})
        self.register_buffer("owner_ids", torch.tensor([owner], dtype=torch.long))
        self.training_owner: int | None = None
        object.__setattr__(self, "follow", follow)  # not a submodule: the model owns it

    @property
    def owners(self) -> list[int]:
        """Owners with a copy, in order of addition."""
        return self.owner_ids.tolist()

    def add_owner(self, owner: int, *, classes: Iterable[int] | None = None) -> nn.Module:
        """Give ``owner`` a copy of the newest owner's module (``classes`` are ignored)."""
        owner = check_owner("owner", owner)
        if owner in self.owners:
            return self.copies[str(owner)]
        new = copy.deepcopy(self.copies[str(self.owners[-1])])
        new.requires_grad_(True)
        self.copies[str(owner)] = new
        self.owner_ids = torch.cat([self.owner_ids, self.owner_ids.new_tensor([owner])])
        return new

    def freeze(self, owners: Iterable[int] | None = None, *, frozen: bool = True) -> None:
        """Stop (or restart) training the copies of ``owners``; a frozen BatchNorm copy
        also stops updating its running statistics."""
        freeze_per_owner(self.copies, self.owners, owners, frozen)

    def current_owners(self) -> int | torch.Tensor:
        """The owner (int) or per-sample owners (tensor) the next forward uses."""
        if self.training:
            return self.owners[-1] if self.training_owner is None else self.training_owner
        refuse_query_inference(self.follow, "OwnerCopies need")
        chosen = None if self.follow is None else self.follow.eval_owners
        return eval_owners_or_newest(chosen, self.owners[-1])

    def forward(self, x: torch.Tensor, owners: int | torch.Tensor | None = None) -> torch.Tensor:
        owners = self.current_owners() if owners is None else owners
        if not isinstance(owners, torch.Tensor) or owners.dim() == 0:
            return self._copy(int(owners))(x)
        if owners.shape != x.shape[:1]:
            raise ValueError(f"owners: expected shape ({x.shape[0]},), got {tuple(owners.shape)}")
        return apply_per_owner(x, owners, lambda part, o: self._copy(o)(part))

    def _copy(self, owner: int) -> nn.Module:
        if owner not in self.owners:
            raise ValueError(f"owners: expected owners among {self.owners}, got {owner}")
        frozen = not any(p.requires_grad for p in self.copies[str(owner)].parameters())
        module = self.copies[str(owner)]
        if self.training and frozen:  # frozen: running statistics stay still too
            module.eval()
        elif self.training:
            module.train()
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Create the copies a checkpoint holds before loading them."""
        ids = state_dict.get(prefix + "owner_ids")
        if ids is not None:
            template = self.copies[str(self.owners[0])]
            kept = dict(self.copies.items())
            self.copies = nn.ModuleDict(
                {str(o): kept.get(str(o), copy.deepcopy(template)) for o in ids.tolist()}
            )
            self.owner_ids = ids.clone().to(self.owner_ids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"owners={self.owners}"


def with_owner_norms(model: nn.Module) -> nn.Module:
    """Give every normalisation layer outside PEER layers per-owner copies.

    Replaces each ``LayerNorm`` / ``BatchNorm*`` / ``GroupNorm`` child of ``model``'s
    modules (not the PEER layers' own query norms) by an :class:`OwnerCopies` that
    follows the model's first PEER layer. Use it with owners known before the forward
    (``peer_protect(inference="input")`` or "oracle"); call it before building the
    optimizer.

    Returns:
        ``model``, changed in place.
    """
    layers = [m for m in model.modules() if isinstance(m, PEER)]
    if not layers:
        raise ValueError(f"model: expected a model with PEER layers, got {type(model).__name__}")
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    inside_peer = {id(m) for layer in layers for m in layer.modules()}
    targets = [
        (parent, name, child)
        for parent in model.modules()
        if id(parent) not in inside_peer and not isinstance(parent, OwnerCopies)
        for name, child in parent.named_children()
        if isinstance(child, norms)
    ]
    if not targets:
        raise ValueError("model: expected normalisation layers outside the PEER layers, got none")
    owner = int(layers[0].segment_owner[0])
    for parent, name, child in targets:
        setattr(parent, name, OwnerCopies(child, owner=owner, follow=layers[0]))
    return model


__all__ = ["OwnerCopies", "with_owner_norms"]
