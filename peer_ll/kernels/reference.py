"""Pure-torch reference kernels: the CPU path and the oracle for the Triton kernels.

Axis letters used in shapes:
    T  tokens (flattened leading dims)      H  heads
    K  experts retrieved per head (top-k)   D  input dim     E  output dim
    d  dim_key                              S  segments      R  sub-key rows
    M  gathers per token (H·K)

A pool of experts is a list of *segments*. Segment ``s`` is a row of the int64
table ``segments`` (S, 4) = ``[key_offset, n_left, n_right, expert_offset]``: its
left sub-keys are ``sub_keys[key_offset : key_offset + n_left, 0]``, its right
sub-keys ``sub_keys[key_offset : key_offset + n_right, 1]``, and the expert built
from left key ``a`` and right key ``b`` has the id ``expert_offset + a * n_right + b``.
Ids never change when segments are appended.

The CPU path avoids building (T, M, D) gathers: row dot products are one sampled
matrix product (:func:`gather_dot`), weighted row sums use ``embedding_bag``, and
row gradients use one sort (:mod:`peer_ll.kernels.row_grad`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from peer_ll.kernels.row_grad import aggregate_rows, key_table_grad, row_plan, to_table_grad

ACTIVATIONS = ("gelu", "relu")
_CHUNK_ELEMENTS = 1 << 20  # elements of one gathered chunk on CPU (4 MiB in fp32): in cache
_CUDA_CHUNK_ELEMENTS = 1 << 27  # on CUDA only memory matters: 256 MiB in bf16
_SAMPLED_DTYPES = (torch.float32, torch.float64)  # dtypes of CPU sampled_addmm


def product_topk(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    segments: torch.Tensor,
    k: int,
    *,
    segment_mask: torch.Tensor | None = None,
    topk=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all product keys of all segments (not differentiable).

    Inside a segment the paper's product-key search is exact: the top-k of the
    k_l·k_r sums of per-half top-k scores equals the top-k over all full keys.
    The union of every segment's top-k therefore holds the global top-k.

    Args:
        queries: (T, H, d) queries, d even.
        sub_keys: (R, 2, d/2) sub-key table; ``[:, 0]`` left halves, ``[:, 1]`` right.
        segments: (S, 4) int64 segment table (see module docstring).
        k: number of experts to return per token and head.
        segment_mask: optional (T, S) bool; False excludes a segment for a token.
        topk: the row top-k to use, ``(x (..., n), k) -> (values, indices)`` sorted
            descending like ``torch.topk(x, k, dim=-1)`` (the default).

    Returns:
        scores (T, H, k) sorted descending, and ids (T, H, k) int64 expert ids.
        Places without an expert (fewer than k experts allowed) score ``-inf``
        and have the id -1.
    """
    topk = topk or (lambda x, k: x.topk(k, dim=-1))  # (values, indices) along the last axis
    half = queries.shape[-1] // 2
    q_left, q_right = queries[..., :half], queries[..., half:]
    used = int((segments[:, 0] + segments[:, 1:3].max(dim=1).values).max())
    left = q_left @ sub_keys[:used, 0].T  # (T, H, R)
    right = q_right @ sub_keys[:used, 1].T  # (T, H, R)
    cand_scores, cand_ids = [], []
    for s, (offset, n_left, n_right, expert_offset) in enumerate(segments.tolist()):
        k_left, k_right = min(k, n_left), min(k, n_right)
        s_left, i_left = topk(left[..., offset : offset + n_left], k_left)
        s_right, i_right = topk(right[..., offset : offset + n_right], k_right)
        # Both lists are sorted: pair (a, b) of ranks has (a+1)(b+1)-1 pairs at least as
        # good, so only pairs with (a+1)(b+1) <= k can be in the top-k (~k·ln k of k²).
        a, b = _rank_pairs(k_left, k_right, k, queries.device)
        sums = s_left.index_select(-1, a) + s_right.index_select(-1, b)  # (T, H, P)
        ids = expert_offset + i_left.index_select(-1, a) * n_right + i_right.index_select(-1, b)
        if sums.shape[-1] > k:
            sums, pick = topk(sums, k)
            ids = ids.gather(-1, pick)
        if segment_mask is not None:
            sums = sums.masked_fill(~segment_mask[:, s, None, None], -math.inf)
        cand_scores.append(sums)
        cand_ids.append(ids)
    scores = torch.cat(cand_scores, dim=-1)
    ids = torch.cat(cand_ids, dim=-1)
    if scores.shape[-1] < k:  # fewer experts than k: pad with -inf scores
        pad = k - scores.shape[-1]
        scores = F.pad(scores, (0, pad), value=-math.inf)
        ids = F.pad(ids, (0, pad), value=-1)
    scores, pick = topk(scores, k)
    ids = ids.gather(-1, pick).masked_fill_(scores == -math.inf, -1)
    return scores, ids


def _rank_pairs(
    k_left: int, k_right: int, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b), a < k_left, b < k_right, with (a + 1)(b + 1) <= k."""
    a = torch.arange(k_left, device=device)[:, None]
    b = torch.arange(k_right, device=device)[None, :]
    keep = ((a + 1) * (b + 1) <= k).nonzero()
    return keep[:, 0], keep[:, 1]


def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    """σ(a): exact (erf) GELU or ReLU."""
    return F.gelu(a) if activation == "gelu" else F.relu(a)


def activate_grad(a: torch.Tensor, activation: str) -> torch.Tensor:
    """σ'(a) for :func:`activate`."""
    if activation == "relu":
        return (a > 0).to(a.dtype)
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + a * pdf


def gather_dot(ids: torch.Tensor, table: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Row dot products ``out[t, m] = table[ids[t, m]] · vec[t]``, without a (T, M, C) gather.

    On CPU (fp32/fp64) this is one sampled matrix product
    (``torch.sparse.sampled_addmm`` over the (T, N) pattern of ``ids``): one
    parallel op that reads each gathered row once. Elsewhere it gathers in token
    chunks (small enough to stay in cache on CPU, a few hundred MiB on CUDA).

    Args:
        ids: (T, M) int64 row ids.
        table: (N, C) rows.
        vec: (T, C) one vector per token.

    Returns:
        (T, M) in ``table``'s dtype.
    """
    T, M = ids.shape
    vec = vec.to(table.dtype)
    # sampled_addmm rejects a row pattern with more entries than the table has rows
    # (repeated ids across heads in a tiny pool); such pools take the gather path.
    if not table.is_cuda and table.dtype in _SAMPLED_DTYPES and T * M and M <= table.shape[0]:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                torch.arange(0, T * M + 1, M, device=ids.device),
                ids.reshape(-1),
                vec.new_zeros(T * M),
                (T, table.shape[0]),
                check_invariants=False,
            )
            out = torch.sparse.sampled_addmm(pattern, vec, table.T, beta=0.0)
        return out.values().view(T, M)
    out = vec.new_empty(T, M)
    budget = _CUDA_CHUNK_ELEMENTS if table.is_cuda else _CHUNK_ELEMENTS
    chunk = max(1, budget // max(1, M * table.shape[-1]))
    for start in range(0, T, chunk):  # a loop over memory-sized chunks, not tokens
        stop = min(T, start + chunk)
        rows = F.embedding(ids[start:stop], table)  # (chunk, M, C)
        torch.bmm(rows, vec[start:stop, :, None], out=out[start:stop, :, None])
    return out


class _ExpertMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, gates, down, up, activation, frozen, sparse_grad):
        T = x.shape[0]
        flat_ids = ids.reshape(T, -1)  # (T, M), M = H*K
        flat_gates = gates.reshape(T, -1)
        a = gather_dot(flat_ids, down, x)  # (T, M)
        w = activate(a, activation) * flat_gates  # (T, M)
        out = F.embedding_bag(flat_ids, up, per_sample_weights=w.to(up.dtype), mode="sum")
        ctx.save_for_backward(x, flat_ids, flat_gates, down, up, a, frozen)
        ctx.activation, ctx.sparse_grad, ctx.gate_shape = activation, sparse_grad, gates.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, flat_ids, flat_gates, down, up, a, frozen = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        h = activate(a, ctx.activation)
        gv = gather_dot(flat_ids, up, grad_out)  # (T, M): grad_out · v_i
        grad_gates = (gv * h).reshape(ctx.gate_shape) if ctx.needs_input_grad[2] else None
        da = gv * flat_gates * activate_grad(a, ctx.activation)  # (T, M)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                flat_ids, down, per_sample_weights=da.to(down.dtype), mode="sum"
            ).to(x.dtype)
        grad_down = grad_up = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            plan = row_plan(flat_ids, frozen)  # one sort serves both tables
            if ctx.needs_input_grad[3]:
                values = aggregate_rows(plan, da, x.to(down.dtype))
                grad_down = to_table_grad(plan, values, down.shape, sparse=ctx.sparse_grad)
            if ctx.needs_input_grad[4]:
                values = aggregate_rows(plan, h * flat_gates, grad_out.to(up.dtype))
                grad_up = to_table_grad(plan, values, up.shape, sparse=ctx.sparse_grad)
        return grad_x, None, grad_gates, grad_down, grad_up, None, None, None


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
) -> torch.Tensor:
    """Mix retrieved singleton experts: ``Σ_{h,i} g_hi · σ(u_iᵀ x) · v_i``.

    Args:
        x: (T, D) inputs.
        ids: (T, H, K) int64 expert ids (rows of ``down`` and ``up``), all valid.
        gates: (T, H, K) gate values.
        down: (N, D) table of u_i.
        up: (N, E) table of v_i.
        activation: "gelu" (exact, erf-based) or "relu".
        frozen: optional (N,) bool; frozen rows receive no gradient.
        sparse_grad: give ``down`` and ``up`` row-sparse (COO) gradients.

    Returns:
        (T, E) outputs.
    """
    if frozen is None:
        frozen = torch.empty(0, dtype=torch.bool, device=x.device)
    return _ExpertMix.apply(x, ids, gates, down, up, activation, frozen, sparse_grad)


class _SelectedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, sub_keys, left, right, frozen):
        TH, half = q.shape[0] * q.shape[1], q.shape[-1] // 2
        q_rows = q.reshape(TH, -1)
        ids_l, ids_r = left.reshape(TH, -1), right.reshape(TH, -1)
        scores = gather_dot(ids_l, sub_keys[:, 0], q_rows[:, :half]) + gather_dot(
            ids_r, sub_keys[:, 1], q_rows[:, half:]
        )
        ctx.save_for_backward(q_rows, sub_keys, ids_l, ids_r, frozen)
        return scores.view(left.shape)

    @staticmethod
    def backward(ctx, grad):
        q_rows, sub_keys, ids_l, ids_r, frozen = ctx.saved_tensors
        g = grad.reshape(ids_l.shape).to(sub_keys.dtype)  # (T·H, K)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_q = (
                torch.cat(
                    [
                        F.embedding_bag(ids_l, sub_keys[:, 0], per_sample_weights=g, mode="sum"),
                        F.embedding_bag(ids_r, sub_keys[:, 1], per_sample_weights=g, mode="sum"),
                    ],
                    dim=-1,
                )
                .view(*grad.shape[:2], -1)
                .to(q_rows.dtype)
            )
        if ctx.needs_input_grad[1]:
            half = q_rows.shape[-1] // 2
            rhs = q_rows.to(sub_keys.dtype)
            sides = [
                key_table_grad(ids, g, rhs[:, i * half : (i + 1) * half], sub_keys.shape[0], frozen)
                for i, ids in enumerate((ids_l, ids_r))
            ]
            grad_keys = torch.stack(sides, dim=1)
        return grad_q, grad_keys, None, None, None


def selected_scores(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable scores ``q_left·c_left + q_right·c_right`` of retrieved experts.

    Costs T·H·K·d. Gradients reach the queries and the sub-key rows that are not
    frozen (a dense (R, 2, d/2) gradient whose frozen rows are zero).

    Args:
        queries: (T, H, d) queries.
        sub_keys: (R, 2, d/2) sub-key table.
        left: (T, H, K) int64 left sub-key rows of the retrieved experts.
        right: (T, H, K) int64 right sub-key rows.
        frozen: optional (R,) bool; frozen sub-key rows get no gradient.

    Returns:
        (T, H, K) scores.
    """
    if frozen is None:
        frozen = torch.empty(0, dtype=torch.bool, device=queries.device)
    return _SelectedScores.apply(queries, sub_keys, left, right, frozen)
