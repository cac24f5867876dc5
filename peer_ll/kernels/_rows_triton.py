"""Triton kernels of :func:`peer_ll.kernels.row_grad.aggregate_rows`.

Imported lazily, on the first Triton call. Two ways to sum the places of each row:

- sorted (deterministic): one program per (row, column block) walks that row's
  places in sorted order, so every run adds in the same order;
- atomic: one program per block of places adds into an fp32 (U, C) buffer with
  ``tl.atomic_add``; the order of the additions, and so the last bits, may vary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_grad_sorted_kernel(
    order_ptr,
    offsets_ptr,
    coef_ptr,
    rhs_ptr,
    out_ptr,
    C,
    M,
    stride_rhs,
    stride_out,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    u = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = tl.load(offsets_ptr + u)
    stop = tl.load(offsets_ptr + u + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j0 in range(start, stop, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        ok = j < stop
        place = tl.load(order_ptr + j, mask=ok, other=0)
        coef = tl.load(coef_ptr + place, mask=ok, other=0.0).to(tl.float32)
        rows = tl.load(
            rhs_ptr + (place // M)[:, None] * stride_rhs + cols[None, :],
            mask=ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(coef[:, None] * rows, axis=0)
    tl.store(out_ptr + u * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _row_grad_atomic_kernel(
    order_ptr,
    slots_ptr,
    coef_ptr,
    rhs_ptr,
    out_ptr,
    P,
    C,
    M,
    stride_rhs,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = j < P
    both = ok[:, None] & (cols[None, :] < C)
    place = tl.load(order_ptr + j, mask=ok, other=0)
    slot = tl.load(slots_ptr + j, mask=ok, other=0)
    coef = tl.load(coef_ptr + place, mask=ok, other=0.0).to(tl.float32)
    rows = tl.load(
        rhs_ptr + (place // M)[:, None] * stride_rhs + cols[None, :], mask=both, other=0.0
    ).to(tl.float32)
    tl.atomic_add(out_ptr + slot[:, None] * C + cols[None, :], coef[:, None] * rows, mask=both)


def aggregate_rows_triton(
    plan, coeffs: torch.Tensor, rhs: torch.Tensor, *, deterministic: bool = True
) -> torch.Tensor:
    """(U, C) per-row sums of a :class:`~peer_ll.kernels.row_grad.RowPlan`, in rhs's dtype.

    Args:
        plan: the row plan (its ``order``, ``offsets``, ``slots``, ``width``).
        coeffs: (T, M) per-place coefficients.
        rhs: (T, C) per-position vectors, unit stride along C.
        deterministic: sorted per-row sums (True) or fp32 atomics (False).
    """
    U, C = plan.rows.numel(), rhs.shape[-1]
    if rhs.stride(-1) != 1:
        rhs = rhs.contiguous()
    coef = coeffs.reshape(-1).contiguous()
    BLOCK_C = min(128, max(16, triton.next_power_of_2(C)))
    if deterministic:
        out = torch.empty(U, C, dtype=rhs.dtype, device=rhs.device)
        if U:
            grid = (U, triton.cdiv(C, BLOCK_C))
            _row_grad_sorted_kernel[grid](
                plan.order,
                plan.offsets,
                coef,
                rhs,
                out,
                C,
                plan.width,
                rhs.stride(0),
                out.stride(0),
                BLOCK_P=16,
                BLOCK_C=BLOCK_C,
            )
        return out
    out = torch.zeros(U, C, dtype=torch.float32, device=rhs.device)
    P = plan.order.numel()
    if P:
        BLOCK_P = 32
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))
        _row_grad_atomic_kernel[grid](
            plan.order,
            plan.slots,
            coef,
            rhs,
            out,
            P,
            C,
            plan.width,
            rhs.stride(0),
            BLOCK_P=BLOCK_P,
            BLOCK_C=BLOCK_C,
        )
    return out.to(rhs.dtype)
