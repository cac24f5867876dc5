"""A PEER branch beside a feed-forward block, and the scoped context that carries owners.

``ExpertBranch(base, experts)`` computes ``base(x) + experts(x, owners=...)``; the
base domain's inputs skip the experts entirely, so their outputs are the base
block's, bit for bit. ``experts`` is a PEER layer, or a
:class:`~peer_ll.experts.PerOwner` of per-domain modules (the low-rank deltas of
:mod:`peer_ll.adapters.targets`). The owners of each input arrive as an argument
(``branch(x, owners=o)``) or, inside a model that does not pass them (a Hugging
Face ``GPT2MLP`` is called as ``mlp(hidden_states)``), through
:func:`owners_scope`: a ``contextvars`` scope that one forward enters and leaves,
and that leaves nothing behind (no attribute written, no hook registered).

Axis letters: ``B`` batch, ``T`` positions, ``D`` width.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_owner
from peer_ll.experts.per_owner import PerOwner

Owners = int | Sequence[int] | torch.Tensor | None

_SCOPED_OWNERS: contextvars.ContextVar[Owners] = contextvars.ContextVar(
    "peer_ll_adapter_owners", default=None
)


@contextlib.contextmanager
def owners_scope(owners: Owners) -> Iterator[None]:
    """Route every :class:`ExpertBranch` called inside the block by ``owners``.

    The scope is a ``contextvars.ContextVar``: it is restored on exit, even after
    an exception, and threads started inside do not see it.

    Args:
        owners: None (every domain's experts), an owner id, a sequence of owner
            ids, or an int tensor with one owner per sequence (B,) or per
            position (B, T).
    """
    token = _SCOPED_OWNERS.set(owners)
    try:
        yield
    finally:
        _SCOPED_OWNERS.reset(token)


def scoped_owners() -> Owners:
    """The owners of the innermost :func:`owners_scope` (None outside any)."""
    return _SCOPED_OWNERS.get()


class ExpertBranch(nn.Module):
    """``base(x)`` plus a PEER layer's retrieval restricted to the input's owners.

    Owner ``base_owner`` is the model as it was: its inputs get ``base(x)``
    unchanged. Any other owner's inputs get ``base(x) + experts(x, owners=o)``.
    With a :class:`PerOwner` as ``experts``, a group of owners gets the sum of their
    modules' outputs, and no owners (``None``) gets ``base(x)``.

    Args:
        base: the block, called as ``base(x)``; (..., D) -> (..., E).
        experts: a PEER layer, or a PerOwner of modules, (..., D) -> (..., E).
        base_owner: the owner id of the base model (it owns no experts).

    Shapes:
        x (..., D) -> (..., E).
    """

    takes_owners = True

    def __init__(self, base: nn.Module, experts: PEER | PerOwner, *, base_owner: int = 0) -> None:
        super().__init__()
        if not isinstance(experts, PEER | PerOwner):
            raise TypeError(
                f"experts must be a PEER layer or a PerOwner, got {type(experts).__name__}"
            )
        self.base = base
        self.experts = experts
        self.base_owner = check_owner("base_owner", base_owner)

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """Apply the block and its experts.

        Args:
            x: (..., D) hidden states.
            owners: None (the enclosing :func:`owners_scope`'s owners; outside
                any scope, every domain's experts in one retrieval), an owner id,
                a sequence of owner ids, or an int tensor of shape ``x.shape[:-1]``
                or a leading part of it (e.g. (B,) for (B, T, D)).
        """
        if owners is None:
            owners = scoped_owners()
        owners = self._checked(owners, x)
        out = self.base(x)
        per_owner = isinstance(self.experts, PerOwner)
        if owners is None:
            return out if per_owner else out + self.experts(x)
        if isinstance(owners, torch.Tensor):
            mask = owners != self.base_owner
            if not bool(mask.any()):
                return out
            added = self.experts(x[mask], owners=owners[mask])  # (M, D)
            return out.index_put((mask,), out[mask] + added)
        if not owners:  # only the base owner
            return out
        if per_owner:
            for o in dict.fromkeys(owners):  # each owner of the group once
                out = out + self.experts(x, owners=o)
            return out
        return out + self.experts(x, owners=owners)

    def _checked(self, owners: Owners, x: torch.Tensor) -> Owners:
        """Validate ``owners`` before anything runs; drop the base owner from groups."""
        if owners is None:
            return None
        if isinstance(owners, str | bool | float):
            raise TypeError(
                "owners must be None, an owner id, a sequence of owner ids or an int tensor, "
                f"got {owners!r}"
            )
        present = {self.base_owner, *self.owners}
        if isinstance(owners, torch.Tensor) and owners.dim() > 0:
            if owners.is_floating_point() or owners.dtype == torch.bool:
                raise TypeError(f"owners must have an integer dtype, got {owners.dtype}")
            lead = tuple(x.shape[:-1])
            if tuple(owners.shape) != lead[: owners.dim()]:
                raise ValueError(
                    f"owners must have shape {lead} or a leading part of it, "
                    f"got {tuple(owners.shape)}"
                )
            missing = set(owners.unique().tolist()) - present
            if missing:
                raise ValueError(f"owners must be among {sorted(present)}, got {sorted(missing)}")
            owners = owners.to(x.device)
            return owners.reshape(*owners.shape, *[1] * (len(lead) - owners.dim())).expand(lead)
        group = [owners] if not isinstance(owners, Sequence) else list(owners)
        group = [check_owner("owners", o) for o in group]
        missing = set(group) - present
        if missing:
            raise ValueError(f"owners must be among {sorted(present)}, got {sorted(missing)}")
        return [o for o in group if o != self.base_owner]

    @property
    def owners(self) -> list[int]:
        """The owners with experts (or a module), without the base owner."""
        if isinstance(self.experts, PerOwner):
            return self.experts.owners
        return sorted(set(self.experts.segment_owner.tolist()))

    def extra_repr(self) -> str:
        return f"base_owner={self.base_owner}"
