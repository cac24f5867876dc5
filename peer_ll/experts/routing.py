"""Routing statistics of a PEER layer: router mass, usage and unevenness.

Usage and unevenness follow the PEER paper's Table 2: usage is the share of experts
with non-zero accumulated router mass, unevenness is ``log N + Σ z_i log z_i`` for the
normalised mass ``z`` (0 for a perfectly even load, ``log N`` when one expert takes it all).
These two functions are the package's one copy of the metrics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peer_ll.experts.checks import check_int


def _check_mass(mass: object) -> torch.Tensor:
    if not isinstance(mass, torch.Tensor):
        raise TypeError(f"mass must be a torch.Tensor, got {type(mass).__name__}")
    if mass.numel() == 0:
        raise ValueError("mass must hold at least one expert, got an empty tensor")
    return mass.reshape(-1)


def expert_usage(mass: torch.Tensor) -> float:
    """Share of experts with non-zero router mass. mass: (N,)."""
    mass = _check_mass(mass)
    return float((mass > 0).float().mean())


def unevenness(mass: torch.Tensor) -> float:
    """``log N + Σ z log z`` (0 log 0 = 0) of the normalised mass. mass: (N,).

    Raises:
        ValueError: the mass is empty, negative somewhere, or sums to zero (no routing
            was recorded, so the load has no distribution).
    """
    mass = _check_mass(mass)
    if bool((mass < 0).any()):
        raise ValueError(f"mass must be >= 0 everywhere, got a minimum of {float(mass.min())}")
    total = mass.sum()
    if total <= 0:
        raise ValueError("mass must have a positive sum (record some routing first), got 0.0")
    z = mass.double() / total
    return float(math.log(mass.numel()) + torch.xlogy(z, z).sum())


class RoutingStats(nn.Module):
    """Router mass accumulated per expert row since the last reset.

    The mass is a non-persistent buffer: it is a measurement, not part of a
    checkpoint. ``track`` switches recording on and off.

    Args:
        capacity: expert rows to hold mass for (grows with :meth:`resize`).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        check_int("capacity", capacity, minimum=1)
        self.register_buffer("mass", torch.zeros(capacity), persistent=False)
        #: gates skipped because they were NaN or infinite (a 0-d tensor: no device sync)
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.long), persistent=False)
        self.track = True

    def record(self, ids: torch.Tensor, gates: torch.Tensor) -> None:
        """Add ``gates`` (T, H, K) to the mass of expert ``ids`` (T, H, K).

        Non-finite gates (from a NaN input) add nothing; they are counted in ``nonfinite``.
        """
        gates = gates.reshape(-1).to(self.mass)
        bad = ~torch.isfinite(gates)
        self.nonfinite += bad.sum()
        self.mass.index_add_(0, ids.reshape(-1), gates.masked_fill(bad, 0.0))

    def reset(self) -> None:
        """Zero the accumulated mass (and the count of non-finite gates)."""
        self.mass.zero_()
        self.nonfinite.zero_()

    def resize(self, capacity: int) -> None:
        """Hold ``capacity`` rows; the mass of rows that stay is kept."""
        if capacity != len(self.mass):
            new = self.mass.new_zeros(capacity)
            keep = min(capacity, len(self.mass))
            new[:keep] = self.mass[:keep]
            self.mass = new

    def summary(self, num_experts: int) -> dict[str, float]:
        """``{"usage", "unevenness", "mass"}`` of the first ``num_experts`` rows."""
        mass = self.mass[:num_experts]
        return {
            "usage": expert_usage(mass),
            "unevenness": unevenness(mass),
            "mass": float(mass.sum()),
        }


@torch.no_grad()
def retrieval_confidence(layer: nn.Module, x: torch.Tensor, owners=None) -> dict:
    """Per-token retrieval confidence of a PEER ``layer``: (..., D) -> dict of (..., H).

    ``margin``: the k-th minus the (k+1)-th best score (NaN when the searched pool
    holds only k experts). ``gate_entropy``: entropy of the gates over the k retrieved
    experts (for sigmoid gates, of the normalised gates).
    """
    k = layer.topk
    scores, _ = layer.retrieve(x, owners, k=k + 1, pad=True)  # a missing (k+1)-th scores -inf
    margin = scores[..., k - 1] - scores[..., k]
    top = scores[..., :k]
    gates = top.softmax(-1) if layer.gate == "softmax" else top.sigmoid()
    gates = gates / gates.sum(-1, keepdim=True)
    margin = torch.where(torch.isfinite(margin), margin, torch.full_like(margin, math.nan))
    return {"margin": margin, "gate_entropy": -torch.xlogy(gates, gates).sum(-1)}


def retrieve(layer: nn.Module, x: torch.Tensor, owners=None, *, k=None, pad=False) -> tuple:
    """:meth:`PEER.retrieve`'s body: scores, ids, each (..., H, k), without gradient."""
    k = layer.topk if k is None else check_int("k", k, minimum=1)
    if not pad and owners is None and k > layer.num_experts:
        raise ValueError(
            f"k must be <= the {layer.num_experts} experts in the pool (or pad=True), got {k}"
        )
    segments, mask = layer._searched(x, owners, need=min(k, layer.topk) if pad else k)
    q = layer.query(x)
    lead = q.shape[:-2]
    with torch.no_grad():
        scores, ids = layer._search(q.reshape(-1, layer.heads, layer.dim_key), segments, mask, k)
    return scores.view(*lead, layer.heads, k), ids.view(*lead, layer.heads, k)
