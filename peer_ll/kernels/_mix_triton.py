"""Triton kernels of :func:`peer_ll.kernels.expert_mix.expert_mix`.

Imported lazily, on the first Triton call. One program per token:

- forward: phase 1 gathers the token's M rows u_i in (BLOCK_M, BLOCK_D) tiles
  and writes ``a = u_i·x`` (fp32, kept for the backward); phase 2 gathers the
  rows v_i in (BLOCK_M, BLOCK_E) tiles and accumulates ``Σ g_i·σ(a_i)·v_i``.
- backward: phase 1 gathers v_i again for ``v_i·dy``, writes the gate gradient,
  ``da = (v_i·dy)·g_i·σ'(a_i)`` and the up-table coefficient ``g_i·σ(a_i)``;
  phase 2 gathers u_i for ``dx = Σ da_i·u_i``. The table gradients are row sums
  (:mod:`peer_ll.kernels._rows_triton`).

Ids below 0 stand for "no expert" and contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == "gelu":
        return 0.5 * a * (1.0 + tl.math.erf(a * _INV_SQRT2))
    return tl.maximum(a, 0.0)


@triton.jit
def _act_grad(a, ACT: tl.constexpr):
    if ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(a * _INV_SQRT2))
        return cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return tl.where(a > 0, 1.0, 0.0)


@triton.jit
def _gather_dot(
    t,
    ids,
    ok,
    table_ptr,
    stride_tab,
    vec_ptr,
    stride_vec,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(BLOCK_M,) fp32 dot products of gathered table rows with row ``t`` of ``vec``."""
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        v = tl.load(vec_ptr + t * stride_vec + c, mask=c_ok, other=0.0).to(tl.float32)
        rows = tl.load(
            table_ptr + ids[:, None] * stride_tab + c[None, :],
            mask=ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * v[None, :], axis=1)
    return acc


@triton.jit
def _weighted_rows(
    t,
    coef_ptr,
    ids_ptr,
    M,
    table_ptr,
    stride_tab,
    out_ptr,
    stride_out,
    C,
    ACT_COEF: tl.constexpr,
    gates_ptr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[t] = Σ_m w_m · table[ids[t, m]]``, w = coef or g·σ(coef) (ACT_COEF)."""
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            ids = tl.load(ids_ptr + t * M + m, mask=m < M, other=-1)
            ok = (m < M) & (ids >= 0)
            w = tl.load(coef_ptr + t * M + m, mask=ok, other=0.0)
            if ACT_COEF:
                w = _act(w, ACT) * tl.load(gates_ptr + t * M + m, mask=ok, other=0.0).to(tl.float32)
            rows = tl.load(
                table_ptr + ids[:, None] * stride_tab + c[None, :],
                mask=ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w[:, None] * rows, axis=0)
        tl.store(out_ptr + t * stride_out + c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _expert_mix_fwd_kernel(
    x_ptr,
    ids_ptr,
    gates_ptr,
    down_ptr,
    up_ptr,
    a_ptr,
    out_ptr,
    M,
    D,
    E,
    stride_x,
    stride_down,
    stride_up,
    stride_out,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    for m0 in range(0, M, BLOCK_M):  # phase 1: a = u_i · x
        m = m0 + tl.arange(0, BLOCK_M)
        ids = tl.load(ids_ptr + t * M + m, mask=m < M, other=-1)
        ok = (m < M) & (ids >= 0)
        a = _gather_dot(t, ids, ok, down_ptr, stride_down, x_ptr, stride_x, D, BLOCK_M, BLOCK_D)
        tl.store(a_ptr + t * M + m, a, mask=m < M)
    tl.debug_barrier()  # phase 2 reads a, written by other threads of this program
    _weighted_rows(
        t,
        a_ptr,
        ids_ptr,
        M,
        up_ptr,
        stride_up,
        out_ptr,
        stride_out,
        E,
        True,
        gates_ptr,
        ACT,
        BLOCK_M,
        BLOCK_E,
    )


@triton.jit
def _expert_mix_bwd_kernel(
    dy_ptr,
    ids_ptr,
    gates_ptr,
    down_ptr,
    up_ptr,
    a_ptr,
    dgates_ptr,
    da_ptr,
    coef_up_ptr,
    dx_ptr,
    M,
    D,
    E,
    stride_dy,
    stride_down,
    stride_up,
    stride_dx,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    for m0 in range(0, M, BLOCK_M):  # phase 1: v_i · dy and the per-place gradients
        m = m0 + tl.arange(0, BLOCK_M)
        ids = tl.load(ids_ptr + t * M + m, mask=m < M, other=-1)
        ok = (m < M) & (ids >= 0)
        gv = _gather_dot(t, ids, ok, up_ptr, stride_up, dy_ptr, stride_dy, E, BLOCK_M, BLOCK_E)
        a = tl.load(a_ptr + t * M + m, mask=ok, other=0.0)
        g = tl.load(gates_ptr + t * M + m, mask=ok, other=0.0).to(tl.float32)
        h = _act(a, ACT)
        tl.store(dgates_ptr + t * M + m, (gv * h).to(dgates_ptr.dtype.element_ty), mask=m < M)
        tl.store(da_ptr + t * M + m, gv * g * _act_grad(a, ACT), mask=m < M)
        tl.store(coef_up_ptr + t * M + m, g * h, mask=m < M)
    tl.debug_barrier()  # phase 2 reads da, written by other threads of this program
    _weighted_rows(
        t,
        da_ptr,
        ids_ptr,
        M,
        down_ptr,
        stride_down,
        dx_ptr,
        stride_dx,
        D,
        False,
        gates_ptr,
        ACT,
        BLOCK_M,
        BLOCK_D,
    )


def _blocks(M: int, D: int, E: int) -> tuple[int, int, int]:
    """Tile sizes: up to 32 gathered rows × 128 columns (4096 elements per tile)."""
    block_m = min(32, max(16, triton.next_power_of_2(M)))
    block_d = min(128, max(16, triton.next_power_of_2(D)))
    block_e = min(128, max(16, triton.next_power_of_2(E)))
    return block_m, block_d, block_e


def _rows_ok(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def mix_forward(x, ids, gates, down, up, activation):
    """x (T, D), ids/gates (T, M) -> out (T, E) in x's dtype, a (T, M) fp32."""
    T, M = ids.shape
    D, E = down.shape[1], up.shape[1]
    x, down, up = _rows_ok(x), _rows_ok(down), _rows_ok(up)
    out = torch.empty(T, E, dtype=x.dtype, device=x.device)
    a = torch.empty(T, M, dtype=torch.float32, device=x.device)
    block_m, block_d, block_e = _blocks(M, D, E)
    if T:
        _expert_mix_fwd_kernel[(T,)](
            x,
            ids,
            gates,
            down,
            up,
            a,
            out,
            M,
            D,
            E,
            x.stride(0),
            down.stride(0),
            up.stride(0),
            out.stride(0),
            ACT=activation,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            BLOCK_E=block_e,
        )
    return out, a


def mix_backward(dy, ids, gates, down, up, a, activation, x_dtype):
    """-> dgates (T, M), da (T, M) fp32, coef_up (T, M) fp32, dx (T, D)."""
    T, M = ids.shape
    D, E = down.shape[1], up.shape[1]
    dy, down, up = _rows_ok(dy), _rows_ok(down), _rows_ok(up)
    dgates = torch.empty(T, M, dtype=gates.dtype, device=dy.device)
    da = torch.empty(T, M, dtype=torch.float32, device=dy.device)
    coef_up = torch.empty_like(da)
    dx = torch.empty(T, D, dtype=x_dtype, device=dy.device)
    block_m, block_d, block_e = _blocks(M, D, E)
    if T:
        _expert_mix_bwd_kernel[(T,)](
            dy,
            ids,
            gates,
            down,
            up,
            a,
            dgates,
            da,
            coef_up,
            dx,
            M,
            D,
            E,
            dy.stride(0),
            down.stride(0),
            up.stride(0),
            dx.stride(0),
            ACT=activation,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            BLOCK_E=block_e,
        )
    return dgates, da, coef_up, dx
