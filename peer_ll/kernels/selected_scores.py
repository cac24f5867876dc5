"""Differentiable scores of the retrieved experts: ``q_left·c_left + q_right·c_right``.

Retrieval (:mod:`peer_ll.kernels.product_topk`) is not differentiable. The layer
recomputes the K selected scores of each (token, head) from the gathered sub-key
rows, which costs T·H·K·d, and backpropagates through them to the queries and
to the sub-keys of unfrozen segments. ``selected_scores`` dispatches to the Triton
kernels (:mod:`peer_ll.kernels._scores_triton`, imported on first use) or to the
torch reference.
"""

from __future__ import annotations

import torch

from peer_ll.kernels import reference
from peer_ll.kernels.backend import resolve_backend
from peer_ll.kernels.row_grad import aggregate_rows, row_plan, to_table_grad


class _SelectedScoresTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, sub_keys, left, right, frozen):
        from peer_ll.kernels._scores_triton import scores_forward

        T, H, K = left.shape
        q_rows = q.reshape(T * H, -1).contiguous()
        keys = sub_keys.contiguous()
        ids_l = left.reshape(T * H, K).contiguous()
        ids_r = right.reshape(T * H, K).contiguous()
        scores = scores_forward(q_rows, keys, ids_l, ids_r)
        ctx.save_for_backward(q_rows, keys, ids_l, ids_r, frozen)
        ctx.q_shape = q.shape
        return scores.view(T, H, K)

    @staticmethod
    def backward(ctx, grad):
        from peer_ll.kernels._scores_triton import scores_backward

        q_rows, keys, ids_l, ids_r, frozen = ctx.saved_tensors
        g = grad.reshape(ids_l.shape).contiguous()
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_q = scores_backward(g, keys, ids_l, ids_r, q_rows.dtype).view(ctx.q_shape)
        if ctx.needs_input_grad[1]:
            half = keys.shape[-1]
            rhs = q_rows.to(keys.dtype)
            sides = []
            for i, ids in enumerate((ids_l, ids_r)):
                plan = row_plan(ids, frozen)
                side = rhs[:, i * half : (i + 1) * half]
                values = aggregate_rows(plan, g, side, backend="triton")
                sides.append(to_table_grad(plan, values, (keys.shape[0], half), sparse=False))
            grad_keys = torch.stack(sides, dim=1)
        return grad_q, grad_keys, None, None, None


def selected_scores(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    frozen: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable scores of retrieved experts from their sub-key rows.

    Args:
        queries: (T, H, d) queries.
        sub_keys: (R, 2, d/2) sub-key table; ``[:, 0]`` left halves, ``[:, 1]`` right.
        left: (T, H, K) int64 left sub-key rows of the retrieved experts.
        right: (T, H, K) int64 right sub-key rows.
        frozen: optional (R,) bool; frozen rows get a zero gradient.
        backend: "auto" (Triton on CUDA tensors, torch otherwise), "torch" or "triton".

    Returns:
        (T, H, K) scores; gradients reach ``queries`` and ``sub_keys`` (dense).
    """
    if queries.dim() != 3 or sub_keys.dim() != 3 or 2 * sub_keys.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"queries (T, H, d) and sub_keys (R, 2, d/2) must agree, got queries "
            f"{tuple(queries.shape)} and sub_keys {tuple(sub_keys.shape)}"
        )
    if left.shape != right.shape or left.shape[:2] != queries.shape[:2]:
        raise ValueError(
            f"left and right must both have shape {tuple(queries.shape[:2])} + (K,), got "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    if frozen is None:
        frozen = torch.empty(0, dtype=torch.bool, device=queries.device)
    if resolve_backend(backend, queries, sub_keys) == "triton":
        return _SelectedScoresTriton.apply(queries, sub_keys, left, right, frozen)
    return reference.selected_scores(queries, sub_keys, left, right, frozen=frozen)
