"""Triton kernel of :func:`peer_ll.kernels.product_topk.product_topk`.

Imported lazily, on the first Triton call, so that importing peer_ll never imports
Triton. See ``product_topk.py`` for the algorithm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peer_ll.kernels.backend import COMPILED_MAX_K, interpreting

MAX_K = 64  # register budget of the k_l·k_r candidate chunks
# Packed value of (score -inf, id -1): the smallest value a real candidate can have.
EMPTY = tl.constexpr((-2139095041 << 32) | 0xFFFFFFFF)
SELECTS = ("bitonic", "extract")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _pack(score, idx):
    """(fp32 score, int32 id) -> int64 that orders like (score, id)."""
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving int32 of the float
    return (key.to(tl.int64) << 32) | idx.to(tl.uint32).to(tl.int64)  # id zero-extended


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), packed.to(tl.int32)


@triton.jit
def _select(x, K: tl.constexpr, SELECT: tl.constexpr):
    """Top-K along the last axis of a packed (BLOCK_Q, n) tensor, n >= K a power of 2.

    "bitonic" is ``tl.topk`` (the GPU default). "extract" takes the row max K
    times; it computes the same result and is what Triton's CPU interpreter runs
    fast (its sorting networks reduce with a per-element Python loop). Packed
    candidates are distinct except for EMPTY, which extraction keeps as the floor.
    """
    if SELECT == "bitonic":
        out = tl.topk(x, K)
    else:
        col = tl.arange(0, K)[None, :]
        out = tl.full((x.shape[0], K), EMPTY, tl.int64)
        for i in tl.static_range(K):
            top = tl.max(x, axis=1)[:, None]
            out = tl.where(col == i, top, out)
            x = tl.where(x == top, EMPTY, x)
    return out


@triton.jit
def _merge(best, cand, K: tl.constexpr, BLOCK_Q: tl.constexpr, SELECT: tl.constexpr):
    """Top-K of two (BLOCK_Q, K) packed lists."""
    both = tl.reshape(tl.join(best, cand), (BLOCK_Q, 2 * K))
    return _select(both, K, SELECT)


@triton.jit
def _half_topk(
    q,
    keys_ptr,
    stride_kr,
    key_off,
    n,
    side,
    DH,
    empty,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    IEEE: tl.constexpr,
    SELECT: tl.constexpr,
):
    """Running top-K over ``n`` sub-keys of one side; packed (score, local index)."""
    dh = tl.arange(0, BLOCK_DH)
    best = empty
    for start in range(0, n, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < n
        ptrs = keys_ptr + (key_off + r)[:, None] * stride_kr + side * DH + dh[None, :]
        keys = tl.load(ptrs, mask=ok[:, None] & (dh[None, :] < DH), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(keys.to(q.dtype)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(keys.to(q.dtype)))
        s = tl.where(ok[None, :], s, float("-inf"))
        packed = _pack(s, tl.broadcast_to(tl.where(ok, r, -1)[None, :], (BLOCK_Q, BLOCK_R)))
        if BLOCK_R > K:
            packed = _select(packed, K, SELECT)
        best = _merge(best, packed, K, BLOCK_Q, SELECT)
    return best


@triton.jit
def _chunk(x, c, K: tl.constexpr, CL: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Columns [c·CL, (c+1)·CL) of a packed (BLOCK_Q, K) tensor."""
    groups = tl.reshape(x, (BLOCK_Q, K // CL, CL))
    pick = tl.arange(0, K // CL)[None, :, None] == c
    return tl.sum(tl.where(pick, groups, 0), axis=1)  # exactly one group is picked


@triton.jit
def _product_topk_fwd_kernel(
    q_ptr,
    keys_ptr,
    seg_ptr,
    mask_ptr,
    scores_ptr,
    ids_ptr,
    n_rows,
    S,
    heads,
    k,
    DH,
    stride_kr,
    stride_mt,
    K: tl.constexpr,
    CL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    SELECT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_rows
    dh = tl.arange(0, BLOCK_DH)
    q_mask = row_ok[:, None] & (dh[None, :] < DH)
    q_left = tl.load(q_ptr + rows[:, None] * (2 * DH) + dh[None, :], mask=q_mask, other=0.0)
    q_right = tl.load(q_ptr + rows[:, None] * (2 * DH) + DH + dh[None, :], mask=q_mask, other=0.0)
    empty = tl.full((BLOCK_Q, K), EMPTY, tl.int64)
    best = empty
    rank = tl.arange(0, K)
    for s in range(0, S):
        key_off = tl.load(seg_ptr + s * 4 + 0).to(tl.int32)
        n_left = tl.load(seg_ptr + s * 4 + 1).to(tl.int32)
        n_right = tl.load(seg_ptr + s * 4 + 2).to(tl.int32)
        expert_off = tl.load(seg_ptr + s * 4 + 3).to(tl.int32)
        allowed = row_ok
        if HAS_MASK:
            seg_on = tl.load(mask_ptr + (rows // heads) * stride_mt + s, mask=row_ok, other=0)
            allowed = allowed & (seg_on != 0)
        left = _half_topk(
            q_left,
            keys_ptr,
            stride_kr,
            key_off,
            n_left,
            0,
            DH,
            empty,
            K,
            BLOCK_Q,
            BLOCK_R,
            BLOCK_DH,
            IEEE,
            SELECT,
        )
        right = _half_topk(
            q_right,
            keys_ptr,
            stride_kr,
            key_off,
            n_right,
            1,
            DH,
            empty,
            K,
            BLOCK_Q,
            BLOCK_R,
            BLOCK_DH,
            IEEE,
            SELECT,
        )
        r_score, r_idx = _unpack(right)
        for c in tl.static_range(K // CL):
            l_score, l_idx = _unpack(_chunk(left, c, K, CL, BLOCK_Q))  # (BLOCK_Q, CL)
            sums = l_score[:, :, None] + r_score[:, None, :]  # (BLOCK_Q, CL, K)
            ok = (l_idx[:, :, None] >= 0) & (r_idx[:, None, :] >= 0) & allowed[:, None, None]
            # Rank pruning: with both lists sorted, pair (i, j) has (i+1)(j+1)-1
            # better pairs, so it can only enter the top-k if (i+1)(j+1) <= k.
            l_rank = c * CL + tl.arange(0, CL)
            ok &= (l_rank[None, :, None] + 1) * (rank[None, None, :] + 1) <= k
            ids = expert_off + l_idx[:, :, None] * n_right + r_idx[:, None, :]
            packed = _pack(tl.where(ok, sums, float("-inf")), tl.where(ok, ids, -1))
            packed = _select(tl.reshape(packed, (BLOCK_Q, CL * K)), K, SELECT)
            best = _merge(best, packed, K, BLOCK_Q, SELECT)
    score, idx = _unpack(best)
    out_mask = row_ok[:, None] & (rank[None, :] < k)
    offs = rows[:, None] * k + rank[None, :]
    tl.store(scores_ptr + offs, score.to(scores_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + offs, idx.to(tl.int64), mask=out_mask)


def product_topk_triton(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    segments: torch.Tensor,
    k: int,
    segment_mask: torch.Tensor | None,
    *,
    select: str | None = None,
    block_q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; same contract as ``reference.product_topk``.

    Args:
        select: "bitonic" (``tl.topk``) or "extract"; default "extract" under
            ``TRITON_INTERPRET=1`` and "bitonic" otherwise.
        block_q: query rows per program (a power of 2, >= 16).
    """
    T, H, d = queries.shape
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K} for the Triton product_topk kernel, got {k}")
    if k > COMPILED_MAX_K and not interpreting():
        raise ValueError(
            f"k must be <= {COMPILED_MAX_K} for the compiled Triton product_topk kernel "
            f"(larger k compiles for minutes), got {k}; use backend='torch'"
        )
    if select is None:
        select = "extract" if interpreting() else "bitonic"
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if select == "extract" and not interpreting():
        raise ValueError(
            "select='extract' runs in the interpreter only (it does not compile "
            "for a GPU); use 'bitonic'"
        )
    n_rows = T * H
    q = queries.contiguous()
    keys = sub_keys.contiguous()
    segs = segments.to(device=q.device, dtype=torch.int64).contiguous()
    if int((segs[:, 3] + segs[:, 1] * segs[:, 2]).max()) >= 2**31:
        raise ValueError("expert ids must fit in int32 for the Triton product_topk kernel")
    scores = torch.empty(T, H, k, dtype=q.dtype, device=q.device)
    ids = torch.empty(T, H, k, dtype=torch.int64, device=q.device)
    K = max(2, _next_pow2(k))
    CL = max(1, min(K, 256 // K))  # left ranks per candidate chunk: CL·K <= 256 sums
    BLOCK_Q = block_q or (32 if K <= 8 else 16)  # tl.dot needs >= 16 rows
    n_max = int(segs[:, 1:3].max())
    BLOCK_R = max(16, K, min(64, _next_pow2(n_max)))
    BLOCK_DH = max(16, _next_pow2(d // 2))
    mask = segment_mask
    if mask is not None:
        mask = mask.to(device=q.device, dtype=torch.int8).contiguous()
    grid = (triton.cdiv(n_rows, BLOCK_Q),)
    _product_topk_fwd_kernel[grid](
        q,
        keys,
        segs,
        mask if mask is not None else segs,
        scores,
        ids,
        n_rows,
        segs.shape[0],
        H,
        k,
        d // 2,
        keys.stride(0),
        mask.stride(0) if mask is not None else 0,
        K=K,
        CL=CL,
        BLOCK_Q=BLOCK_Q,
        BLOCK_R=BLOCK_R,
        BLOCK_DH=BLOCK_DH,
        HAS_MASK=mask is not None,
        IEEE=q.dtype == torch.float32,
        SELECT=select,
    )
    return scores, ids
