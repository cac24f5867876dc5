"""Owners as explicit data: the ``owners`` argument, soft mixing, owner-aware modules.

An *owner* is a task or experience id; every expert row of a PEER pool has one. The
owners of each input travel as an argument, ``module(x, owners=...)``, from a model to
each of its layers; nothing is written onto a layer to steer its routing.

``owners`` is one of:

- ``None``: every expert (the paper's layer; costs nothing);
- an int, or a sequence of ints: only those owners' experts, for every input;
- an integer tensor of shape ``x.shape[:-1]``: one owner per input.

Soft mixing over several owners is :func:`mix_owners` with an :class:`OwnerMix`, the
one place that mixes outputs by owner weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from peer_ll.experts.checks import check_owner

Owners = int | Sequence[int] | torch.Tensor | None

_EXPECTED = "None, an int, a sequence of ints or an integer tensor of shape {}"


class OwnerMix(NamedTuple):
    """Soft mixing of M routes per input.

    Attributes:
        ids: (B, M) integer owner ids.
        weights: (B, M, *R) floating weights that sum to 1 over M; ``*R`` (often
            empty) are leading output axes after B that the weights vary over, e.g.
            the positions T of a language model.
    """

    ids: torch.Tensor
    weights: torch.Tensor


def mix_owners(fn: Callable[[torch.Tensor], torch.Tensor], mix: OwnerMix) -> torch.Tensor:
    """``Σ_m weights[:, m] * fn(ids[:, m])``, the weights broadcast over trailing axes.

    Args:
        fn: ``owner_tensor (B,) -> (B, ...)``, e.g. ``lambda o: model(x, owners=o)``.
        mix: the :class:`OwnerMix` of each input.

    Returns:
        (B, ...) the mixture of the M outputs.
    """
    if not isinstance(mix, OwnerMix):
        raise TypeError(f"mix must be an OwnerMix, got {type(mix).__name__}")
    ids, weights = mix
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"mix.ids must be an integer tensor (B, M), got {ids.dtype} {tuple(ids.shape)}"
        )
    if not weights.is_floating_point() or tuple(weights.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"mix.weights must be a float tensor ({ids.shape[0]}, {ids.shape[1]}, "
            f"...), got {weights.dtype} {tuple(weights.shape)}"
        )
    total = weights.sum(1)
    if not torch.allclose(total, torch.ones_like(total), atol=1e-4):
        raise ValueError(
            f"mix.weights must sum to 1 over M, got sums between "
            f"{float(total.min()):.4g} and {float(total.max()):.4g}"
        )
    out = None
    for m in range(ids.shape[1]):
        y = fn(ids[:, m])
        w = weights[:, m]
        w = w.reshape(*w.shape, *[1] * (y.dim() - w.dim())).to(y.dtype)
        out = w * y if out is None else out + w * y
    return out


def call_with_owners(module: nn.Module, x: torch.Tensor, owners: object = None) -> torch.Tensor:
    """``module(x, owners=owners)`` for an owner-aware module, else ``module(x)``.

    A module is owner-aware when its class sets ``takes_owners = True``; its signature
    is then ``forward(x, owners=None)``.
    """
    if getattr(module, "takes_owners", False):
        return module(x, owners=owners)
    return module(x)


def select_segments(
    owners: object,
    segments: torch.Tensor,
    segment_owner: torch.Tensor,
    lead: tuple[int, ...],
    *,
    need: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The segments ``owners`` may search; checks ``owners`` and changes nothing.

    Args:
        owners: see the module docstring.
        segments: (S, 4) segment table ``[key_offset, n_left, n_right, expert_offset]``.
        segment_owner: (S,) owner of each segment.
        lead: the input's leading shape ``x.shape[:-1]``.
        need: experts every input must be able to reach (top-k).

    Returns:
        ``(searched, mask)``: the (S', 4) segments to search, and for per-input owners
        a (T, S) bool mask of the segments each input may use (else None).
    """
    if owners is None:  # every expert: the pool always holds topk (no device sync)
        return segments, None
    keep, mask = _selection(owners, segment_owner, lead)
    sizes = segments[:, 1] * segments[:, 2]  # (S,)
    if keep is not None:
        held = int(sizes[keep].sum())
    else:
        held = int((mask * sizes[None, :]).sum(dim=1).min()) if len(mask) else need
    if held < need:
        raise ValueError(
            f"owners must hold at least topk={need} experts, got owners {owners!r} holding {held}"
        )
    return (segments if keep is None else segments[keep]), mask


def _selection(owners, segment_owner, lead):
    """(keep (S,) or None, mask (T, S) or None) for owners that are not None."""
    present = set(segment_owner.tolist())
    if isinstance(owners, torch.Tensor) and owners.dim() > 0:
        if owners.is_floating_point() or owners.is_complex() or owners.dtype == torch.bool:
            raise TypeError(f"owners must be an integer tensor, got {owners.dtype}")
        if tuple(owners.shape) != tuple(lead):
            raise ValueError(
                f"owners must have shape {tuple(lead)} (one per input), got {tuple(owners.shape)}"
            )
        flat = owners.reshape(-1).to(segment_owner.device)
        _check_present(set(flat.unique().tolist()), present)
        return None, flat[:, None] == segment_owner[None, :]
    if isinstance(owners, int | torch.Tensor):
        wanted = {check_owner("owners", owners)}
    elif isinstance(owners, Sequence) and not isinstance(owners, str | bytes):
        wanted = {check_owner("owners", o) for o in owners}
    else:
        raise TypeError(
            f"owners must be {_EXPECTED.format(tuple(lead))}, got {type(owners).__name__}"
        )
    _check_present(wanted, present)
    keep = torch.tensor(
        [o in wanted for o in segment_owner.tolist()], dtype=torch.bool, device=segment_owner.device
    )
    return keep, None


def _check_present(wanted: set[int], present: set[int]) -> None:
    missing = wanted - present
    if missing or not wanted:
        raise ValueError(f"owners must be among {sorted(present)}, got {sorted(wanted)}")
