"""Triton kernels of :func:`peer_ll.kernels.selected_scores.selected_scores`.

Imported lazily, on the first Triton call. One program per query row (token,
head): it gathers the K left and right sub-key rows of the retrieved experts in
(K, BLOCK_DH) tiles. The forward writes ``q_left·c_left + q_right·c_right``; the
backward writes ``dq = [Σ g·c_left ; Σ g·c_right]``. The sub-key gradients are
row sums (:mod:`peer_ll.kernels._rows_triton`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _selected_scores_fwd_kernel(
    q_ptr,
    keys_ptr,
    left_ptr,
    right_ptr,
    out_ptr,
    K,
    DH,
    stride_kr,
    BLOCK_K: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    left = tl.load(left_ptr + row * K + kk, mask=k_ok, other=0)
    right = tl.load(right_ptr + row * K + kk, mask=k_ok, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(0, DH, BLOCK_DH):
        c = c0 + tl.arange(0, BLOCK_DH)
        both = k_ok[:, None] & (c < DH)[None, :]
        q_l = tl.load(q_ptr + row * 2 * DH + c, mask=c < DH, other=0.0).to(tl.float32)
        q_r = tl.load(q_ptr + row * 2 * DH + DH + c, mask=c < DH, other=0.0).to(tl.float32)
        c_l = tl.load(keys_ptr + left[:, None] * stride_kr + c[None, :], mask=both, other=0.0)
        c_r = tl.load(keys_ptr + right[:, None] * stride_kr + DH + c[None, :], mask=both, other=0.0)
        acc += tl.sum(c_l.to(tl.float32) * q_l[None, :] + c_r.to(tl.float32) * q_r[None, :], 1)
    tl.store(out_ptr + row * K + kk, acc.to(out_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _selected_scores_bwd_kernel(
    g_ptr,
    keys_ptr,
    left_ptr,
    right_ptr,
    dq_ptr,
    K,
    DH,
    stride_kr,
    BLOCK_K: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    left = tl.load(left_ptr + row * K + kk, mask=k_ok, other=0)
    right = tl.load(right_ptr + row * K + kk, mask=k_ok, other=0)
    g = tl.load(g_ptr + row * K + kk, mask=k_ok, other=0.0).to(tl.float32)
    for c0 in range(0, DH, BLOCK_DH):
        c = c0 + tl.arange(0, BLOCK_DH)
        both = k_ok[:, None] & (c < DH)[None, :]
        c_l = tl.load(keys_ptr + left[:, None] * stride_kr + c[None, :], mask=both, other=0.0)
        c_r = tl.load(keys_ptr + right[:, None] * stride_kr + DH + c[None, :], mask=both, other=0.0)
        dq_l = tl.sum(g[:, None] * c_l.to(tl.float32), axis=0)
        dq_r = tl.sum(g[:, None] * c_r.to(tl.float32), axis=0)
        dtype = dq_ptr.dtype.element_ty
        tl.store(dq_ptr + row * 2 * DH + c, dq_l.to(dtype), mask=c < DH)
        tl.store(dq_ptr + row * 2 * DH + DH + c, dq_r.to(dtype), mask=c < DH)


def _launch_args(q_rows, keys, K):
    DH = q_rows.shape[-1] // 2
    block_k = max(16, triton.next_power_of_2(K))
    block_dh = min(max(16, triton.next_power_of_2(DH)), max(16, 4096 // block_k))
    return DH, block_k, block_dh


def scores_forward(q_rows, keys, left, right):
    """q_rows (TH, d) contiguous, keys (R, 2, d/2) contiguous, left/right (TH, K)."""
    TH, K = left.shape
    DH, block_k, block_dh = _launch_args(q_rows, keys, K)
    out = torch.empty(TH, K, dtype=q_rows.dtype, device=q_rows.device)
    if TH:
        _selected_scores_fwd_kernel[(TH,)](
            q_rows,
            keys,
            left,
            right,
            out,
            K,
            DH,
            keys.stride(0),
            BLOCK_K=block_k,
            BLOCK_DH=block_dh,
        )
    return out


def scores_backward(grad, keys, left, right, q_dtype):
    """grad (TH, K) -> dq (TH, d)."""
    TH, K = left.shape
    DH = keys.shape[-1]
    _, block_k, block_dh = _launch_args(keys.new_empty(0, 2 * DH), keys, K)
    dq = torch.empty(TH, 2 * DH, dtype=q_dtype, device=grad.device)
    if TH:
        _selected_scores_bwd_kernel[(TH,)](
            grad,
            keys,
            left,
            right,
            dq,
            K,
            DH,
            keys.stride(0),
            BLOCK_K=block_k,
            BLOCK_DH=block_dh,
        )
    return dq
