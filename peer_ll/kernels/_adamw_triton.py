"""Triton kernel of :func:`peer_ll.kernels.lazy_adamw.lazy_adamw_`: in-place AdamW on rows.

Imported lazily, on the first Triton call. One program updates a block of
``BLOCK_R`` listed rows × ``BLOCK_C`` columns of the parameter and both moments in
place (fp32 arithmetic, moments stored in their own dtype); each element is read
and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 8, 128


@triton.jit
def _lazy_adamw_kernel(
    p_ptr,
    m_ptr,
    v_ptr,
    g_ptr,
    rows_ptr,
    R,
    C,
    G_BY_ROW,
    decay,
    beta1,
    c1,
    beta2,
    c2,
    step_size,
    bc2_sqrt,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_r = i < R
    ok = ok_r[:, None] & (cols < C)[None, :]
    rows = tl.load(rows_ptr + i, mask=ok_r, other=0)
    at = rows[:, None] * C + cols[None, :]
    g_row = tl.where(G_BY_ROW != 0, rows, i.to(tl.int64))
    g = tl.load(g_ptr + g_row[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + at, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + at, mask=ok, other=0.0).to(tl.float32) * beta1 + g * c1
    v = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32) * beta2 + g * g * c2
    tl.store(m_ptr + at, m.to(m_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + at, v.to(v_ptr.dtype.element_ty), mask=ok)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p * decay - step_size * m / denom
    tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=ok)


def lazy_adamw_triton(param, exp_avg, exp_avg_sq, grad, rows, grad_by_row, scalars) -> None:
    """Launch :func:`_lazy_adamw_kernel`; ``scalars`` as from ``lazy_adamw._scalars``."""
    R, C = rows.numel(), param.shape[1]
    if R == 0:
        return
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _lazy_adamw_kernel[grid](
        param,
        exp_avg,
        exp_avg_sq,
        grad,
        rows.to(torch.int64),
        R,
        C,
        int(grad_by_row),
        *scalars,
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
    )
