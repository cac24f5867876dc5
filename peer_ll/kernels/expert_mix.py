"""Fused expert mixing: gather u_i, σ(x·u_i), gate, accumulate g·v_i.

The public function dispatches to the Triton kernel or to the torch reference.
"""

from __future__ import annotations

import torch

from peer_ll.kernels import reference
from peer_ll.kernels.backend import resolve_backend


def expert_mix(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    *,
    activation: str = "gelu",
    frozen: torch.Tensor | None = None,
    sparse_grad: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Mix retrieved experts; see ``reference.expert_mix`` for shapes."""
    if resolve_backend(backend, x, down) == "triton":
        raise RuntimeError("the Triton expert_mix kernel is not available in this build")
    return reference.expert_mix(
        x, ids, gates, down, up, activation=activation, frozen=frozen, sparse_grad=sparse_grad
    )
