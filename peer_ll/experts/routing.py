"""Routing statistics of a PEER layer: router mass, usage, unevenness, confidence.

Usage and unevenness follow the PEER paper's Table 2: usage is the share of experts
with non-zero accumulated router mass, unevenness is ``log N + Σ z_i log z_i`` for the
normalised mass ``z`` (0 for a perfectly even load, ``log N`` when one expert takes it all).
"""

from __future__ import annotations

import math

import torch


def expert_usage(mass: torch.Tensor) -> float:
    """Share of experts with non-zero router mass. mass: (N,)."""
    if mass.numel() == 0:
        raise ValueError("mass must hold at least one expert, got an empty tensor")
    return float((mass > 0).float().mean())


def unevenness(mass: torch.Tensor) -> float:
    """``log N + Σ z log z`` (0 log 0 = 0) of the normalised mass. mass: (N,)."""
    if mass.numel() == 0:
        raise ValueError("mass must hold at least one expert, got an empty tensor")
    total = mass.sum()
    if total <= 0:
        return float("nan")
    z = mass.double() / total
    return float(math.log(mass.numel()) + torch.xlogy(z, z).sum())


class RoutingStatsMixin:
    """Mixin: accumulates per-expert router mass since the last reset."""

    router_mass_buffer_name = "router_mass"

    def record_routing(self, ids: torch.Tensor, gates: torch.Tensor) -> None:
        """Add ``gates`` (T, H, K) to the router mass of ``ids`` (T, H, K)."""
        self.router_mass.index_add_(0, ids.reshape(-1), gates.reshape(-1).to(self.router_mass))

    def reset_routing_stats(self) -> None:
        """Zero the accumulated router mass."""
        self.router_mass.zero_()

    @property
    def expert_mass(self) -> torch.Tensor:
        """(N,) router mass accumulated per expert since the last reset."""
        return self.router_mass[: self.num_experts]

    def routing_stats(self) -> dict[str, float]:
        """``{"usage": ..., "unevenness": ..., "mass": total}`` of the accumulated mass."""
        mass = self.expert_mass
        return {
            "usage": expert_usage(mass),
            "unevenness": unevenness(mass),
            "mass": float(mass.sum()),
        }

    @torch.no_grad()
    def retrieval_confidence(self, x: torch.Tensor, owners=None) -> dict[str, torch.Tensor]:
        """Per-token retrieval confidence: (..., D) -> dict of (..., H) tensors.

        ``margin``: the k-th minus the (k+1)-th best score (NaN when the searched
        pool holds only k experts). ``gate_entropy``: entropy of the gates over the
        k retrieved experts (softmax gates; for sigmoid gates, of the normalised gates).
        """
        k = self.topk
        scores, _ = self.retrieve(x, owners, k=k + 1)  # a missing (k+1)-th scores -inf
        margin = scores[..., k - 1] - scores[..., k]
        top = scores[..., :k]
        gates = top.softmax(-1) if self.gate == "softmax" else top.sigmoid()
        gates = gates / gates.sum(-1, keepdim=True)
        entropy = -torch.xlogy(gates, gates).sum(-1)
        margin = torch.where(torch.isfinite(margin), margin, torch.full_like(margin, float("nan")))
        return {"margin": margin, "gate_entropy": entropy}
