"""Fused expert mixing: gather u_i, σ(x·u_i), gate, accumulate g·v_i.

``expert_mix`` dispatches to the Triton kernels (:mod:`peer_ll.kernels._mix_triton`,
imported on first use) or to the torch reference. The backward returns gradients
for x, the gates and both expert tables; the table gradients are row-sparse sums
over the retrieved places (one sort per step serves ``down`` and ``up``), and
frozen rows get none.
"""

from __future__ import annotations

import torch

from peer_ll.kernels import reference
from peer_ll.kernels.backend import resolve_backend
from peer_ll.kernels.row_grad import aggregate_rows, row_plan, to_table_grad


class _ExpertMixTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, gates, down, up, activation, frozen, sparse_grad, deterministic):
        from peer_ll.kernels._mix_triton import mix_forward

        T = x.shape[0]
        flat_ids = ids.reshape(T, -1).contiguous()  # (T, M), M = H*K
        flat_gates = gates.reshape(T, -1).contiguous()
        out, a = mix_forward(x, flat_ids, flat_gates, down, up, activation)
        ctx.save_for_backward(x, flat_ids, flat_gates, down, up, a, frozen)
        ctx.activation, ctx.sparse_grad, ctx.gate_shape = activation, sparse_grad, gates.shape
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from peer_ll.kernels._mix_triton import mix_backward

        x, flat_ids, flat_gates, down, up, a, frozen = ctx.saved_tensors
        dgates, da, coef_up, dx = mix_backward(
            grad_out, flat_ids, flat_gates, down, up, a, ctx.activation, x.dtype
        )
        grad_down = grad_up = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            plan = row_plan(flat_ids, frozen)  # one sort serves both tables
            kw = dict(backend="triton", deterministic=ctx.deterministic)
            if ctx.needs_input_grad[3]:
                values = aggregate_rows(plan, da, x.to(down.dtype), **kw)
                grad_down = to_table_grad(plan, values, down.shape, sparse=ctx.sparse_grad)
            if ctx.needs_input_grad[4]:
                values = aggregate_rows(plan, coef_up, grad_out.to(up.dtype), **kw)
                grad_up = to_table_grad(plan, values, up.shape, sparse=ctx.sparse_grad)
        grad_x = dx if ctx.needs_input_grad[0] else None
        grad_gates = dgates.reshape(ctx.gate_shape) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_gates, grad_down, grad_up, None, None, None, None


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
    deterministic: bool = True,
) -> torch.Tensor:
    """Mix retrieved singleton experts: ``Σ_{h,i} g_hi · σ(u_iᵀ x) · v_i``.

    Args:
        x: (T, D) inputs.
        ids: (T, H, K) int64 expert ids (rows of ``down`` and ``up``).
        gates: (T, H, K) gate values.
        down: (N, D) table of u_i.
        up: (N, E) table of v_i.
        activation: "gelu" (exact, erf-based) or "relu".
        frozen: optional (N,) bool; frozen rows receive no gradient.
        sparse_grad: give ``down`` and ``up`` row-sparse (COO, coalesced) gradients.
        backend: "auto" (Triton on CUDA tensors, torch otherwise), "torch" or "triton".
        deterministic: Triton only: sum table gradients per row in sorted order
            (bitwise reproducible); False uses fp32 atomics.

    Returns:
        (T, E) outputs.
    """
    if x.dim() != 2 or down.dim() != 2 or up.dim() != 2 or x.shape[1] != down.shape[1]:
        raise ValueError(
            f"x (T, D), down (N, D) and up (N, E) must agree, got x {tuple(x.shape)}, "
            f"down {tuple(down.shape)}, up {tuple(up.shape)}"
        )
    if ids.shape != gates.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"ids and gates must both have shape (T={x.shape[0]}, H, K), got ids "
            f"{tuple(ids.shape)} and gates {tuple(gates.shape)}"
        )
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    if frozen is None:
        frozen = torch.empty(0, dtype=torch.bool, device=x.device)
    if resolve_backend(backend, x, down) == "triton":
        return _ExpertMixTriton.apply(
            x, ids, gates, down, up, activation, frozen, sparse_grad, deterministic
        )
    return reference.expert_mix(
        x, ids, gates, down, up, activation=activation, frozen=frozen, sparse_grad=sparse_grad
    )
