"""Per-owner modules: one container for every piece of a model that each owner has its own of.

Grow-and-freeze with owner-restricted retrieval keeps an old owner's PEER output
bit-identical, but a part that every owner shares (the head, the encoder's first layer,
a norm, the query that scores an owner's sub-keys) still drifts, or, frozen, stops a new
owner from learning. :class:`PerOwner` gives each owner (task or experience id) its own
copy of such a part: a new owner's copy starts as a copy of the newest one (or as
``new()`` builds it) and trains while older copies are frozen.

A :class:`PerOwner` is owner-aware (``takes_owners = True``): ``forward(x, owners=None)``
with ``owners`` an int, or an int tensor of ``x``'s leading shape (one owner per input),
or None (the newest owner; ``unknown="identity"`` containers pass x through). The owners
travel as that argument from the model (``peer_ll.experts.call_with_owners``); nothing
about a call is stored. A PEER layer calls its query adapter as ``adapter(q, owner)``.

Routing protection installs them in a model (:mod:`peer_ll.protect.builders`); the
language model gives each owner its own query adapter with one
(:func:`peer_ll.models.transformer.make_peer`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from peer_ll.experts.checks import check_choice, check_int, check_owner

#: Logit of a class outside an owner's class set (finite, so mixing and losses stay finite).
MASKED_LOGIT = -1.0e4
UNKNOWN = ("error", "identity", "first")


class PerOwner(nn.Module):
    """One copy of ``module`` per owner, picked per input: (B, ...) -> what ``module`` gives.

    Args:
        module: the first owner's copy (used as is).
        owner: the first owner.
        new: builds a new owner's module (e.g. an identity-at-init query adapter);
            default: a copy of the newest owner's.
        num_classes: if set, the output's last axis holds class logits and each owner
            masks the classes outside its class set (see :meth:`add_owner`) to
            :data:`MASKED_LOGIT`.
        unknown: what an owner without a copy gets: "error" (ValueError), "identity"
            (the input, unchanged: a query adapter for an owner that has none) or
            "first" (the first owner's copy: one module shared by every owner).

    Buffers:
        ``owner_ids`` (O,) int64 in order of addition; ``class_mask`` (O, C) bool.
    """

    takes_owners = True

    def __init__(
        self,
        module: nn.Module,
        *,
        owner: int = 0,
        new: Callable[[], nn.Module] | None = None,
        num_classes: int | None = None,
        unknown: str = "error",
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        owner = check_owner("owner", owner)
        if new is not None and not callable(new):
            raise TypeError(f"new must be a callable or None, got {type(new).__name__}")
        self.new = new
        self.unknown = check_choice("unknown", unknown, UNKNOWN)
        self.num_classes = (
            None if num_classes is None else check_int("num_classes", num_classes, minimum=1)
        )
        self.copies = nn.ModuleDict({str(owner): module})
        self.register_buffer("owner_ids", torch.tensor([owner], dtype=torch.long))
        self.register_buffer("class_mask", torch.ones(1, num_classes or 0, dtype=torch.bool))

    @property
    def owners(self) -> list[int]:
        """Owners with a copy, in order of addition."""
        return self.owner_ids.tolist()

    @property
    def owner_independent(self) -> bool:
        """Whether every owner gets the same module (``unknown="first"``, one copy)."""
        return self.unknown == "first" and len(self.copies) == 1

    def add_owner(self, owner: int, *, classes: Iterable[int] | None = None) -> nn.Module:
        """Give ``owner`` a copy (or, if it has one, set its class set); returns the copy.

        Args:
            owner: the owner id.
            classes: the owner's classes, with ``num_classes`` (default: every class).
        """
        owner = check_owner("owner", owner)
        mask = self._mask(classes)
        if owner in self.owners:
            self.class_mask[self.owners.index(owner)] = mask
            return self.copies[str(owner)]
        newest = self.copies[str(self.owners[-1])]
        if self.new is None:
            new = copy.deepcopy(newest)
        else:
            like = next(newest.parameters(), None)
            new = self.new()
            new = new if like is None else new.to(device=like.device, dtype=like.dtype)
        new.requires_grad_(True)
        self.copies[str(owner)] = new
        self.owner_ids = torch.cat([self.owner_ids, self.owner_ids.new_tensor([owner])])
        self.class_mask = torch.cat([self.class_mask, mask[None]])
        return new

    def _mask(self, classes: Iterable[int] | None) -> torch.Tensor:
        mask = torch.ones(self.num_classes or 0, dtype=torch.bool, device=self.class_mask.device)
        if classes is None or self.num_classes is None:
            return mask
        wanted = sorted({int(c) for c in classes})
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.num_classes:
            raise ValueError(
                f"classes must be a non-empty set in [0, {self.num_classes}), got {wanted}"
            )
        mask.zero_()
        mask[wanted] = True
        return mask

    def freeze(self, owners: Iterable[int] | None = None, *, frozen: bool = True) -> None:
        """Stop (or, with ``frozen=False``, restart) training the copies of ``owners``
        (None: all). A frozen copy also runs in eval mode (BatchNorm statistics stay)."""
        known = self.owners
        owners = known if owners is None else [check_owner("owners", o) for o in owners]
        missing = sorted(set(owners) - set(known))
        if missing:
            raise ValueError(f"owners must be among {known}, got {missing}")
        for owner in owners:
            self.copies[str(owner)].requires_grad_(not frozen)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, owners: int | torch.Tensor | None = None) -> torch.Tensor:
        """x (B, ...) with owners None | int | int tensor (B, ...) of x's leading shape."""
        if owners is None:
            return self._run(x, self.owners[-1])
        if not isinstance(owners, torch.Tensor) or owners.dim() == 0:
            return self._run(x, check_owner("owners", owners))
        if owners.is_floating_point() or owners.dtype == torch.bool:
            raise TypeError(f"owners must be an integer tensor, got {owners.dtype}")
        lead = owners.shape
        if tuple(x.shape[: owners.dim()]) != tuple(lead):
            raise ValueError(
                f"owners must have shape {tuple(x.shape[: owners.dim()])} (x's "
                f"leading axes), got {tuple(lead)}"
            )
        flat_x, flat_o = x.reshape(-1, *x.shape[owners.dim() :]), owners.reshape(-1).to(x.device)
        parts = {o: self._run(flat_x[flat_o == o], o) for o in flat_o.unique().tolist()}
        first = next(iter(parts.values()))
        out = first.new_empty(flat_x.shape[0], *first.shape[1:])
        for o, y in parts.items():  # a loop over owners, not inputs
            out[flat_o == o] = y
        return out.view(*lead, *first.shape[1:])

    def _run(self, x: torch.Tensor, owner: int) -> torch.Tensor:
        if owner not in self.owners and self.unknown == "first":
            owner = self.owners[0]
        if owner not in self.owners:
            if self.unknown == "identity":
                return x
            raise ValueError(
                f"owners must be among {self.owners} (owners with a copy), got {owner}"
            )
        module = self.copies[str(owner)]
        frozen = not any(p.requires_grad for p in module.parameters())
        module.train(self.training and not frozen)
        out = module(x)
        if self.num_classes is not None:
            out = out.masked_fill(~self.class_mask[self.owners.index(owner)], MASKED_LOGIT)
        return out

    def _resize(self, ids: list[int]) -> None:
        template = self.copies[str(self.owners[0])]
        kept = dict(self.copies.items())
        self.copies = nn.ModuleDict(
            {str(o): kept[str(o)] if str(o) in kept else copy.deepcopy(template) for o in ids}
        )
        self.owner_ids = torch.tensor(ids, dtype=torch.long, device=self.owner_ids.device)
        self.class_mask = torch.ones(
            len(ids), self.class_mask.shape[1], dtype=torch.bool, device=self.class_mask.device
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Create the copies a checkpoint holds before loading them."""
        ids = state_dict.get(prefix + "owner_ids")
        if ids is not None:
            self._resize(ids.tolist())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"owners={self.owners}, unknown={self.unknown!r}"


def per_owner_modules(model: nn.Module) -> list[PerOwner]:
    """The :class:`PerOwner` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, PerOwner)]


__all__ = ["MASKED_LOGIT", "PerOwner", "per_owner_modules"]
