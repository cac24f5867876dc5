"""Pure-torch reference kernels: the CPU path and the oracle for the Triton kernels.

Axis letters used in shapes:
    T  tokens (flattened leading dims)      H  heads
    K  experts retrieved per head (top-k)   D  input dim     E  output dim
    d  dim_key                              S  segments      R  sub-key rows

A pool of experts is a list of *segments*. Segment ``s`` is a row of the int64
table ``segments`` (S, 4) = ``[key_offset, n_left, n_right, expert_offset]``: its
left sub-keys are ``sub_keys[key_offset : key_offset + n_left, 0]``, its right
sub-keys ``sub_keys[key_offset : key_offset + n_right, 1]``, and the expert built
from left key ``a`` and right key ``b`` has the id ``expert_offset + a * n_right + b``.
Ids never change when segments are appended.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "relu")


def product_topk(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    segments: torch.Tensor,
    k: int,
    *,
    segment_mask: torch.Tensor | None = None,
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
            Excluded candidates score ``-inf``. When fewer than k experts exist,
            the missing places score ``-inf`` with id -1.

    Returns:
        scores (T, H, k) sorted descending, and ids (T, H, k) int64 expert ids.
    """
    half = queries.shape[-1] // 2
    q_left, q_right = queries[..., :half], queries[..., half:]
    used = int((segments[:, 0] + segments[:, 1:3].max(dim=1).values).max())
    left = q_left @ sub_keys[:used, 0].T  # (T, H, R)
    right = q_right @ sub_keys[:used, 1].T  # (T, H, R)
    cand_scores, cand_ids = [], []
    for s, (offset, n_left, n_right, expert_offset) in enumerate(segments.tolist()):
        k_left, k_right = min(k, n_left), min(k, n_right)
        s_left, i_left = left[..., offset : offset + n_left].topk(k_left, dim=-1)
        s_right, i_right = right[..., offset : offset + n_right].topk(k_right, dim=-1)
        sums = (s_left[..., :, None] + s_right[..., None, :]).flatten(-2)  # (T, H, kl*kr)
        ids = (expert_offset + i_left[..., :, None] * n_right + i_right[..., None, :]).flatten(-2)
        if sums.shape[-1] > k:
            sums, pick = sums.topk(k, dim=-1)
            ids = ids.gather(-1, pick)
        if segment_mask is not None:
            sums = sums.masked_fill(~segment_mask[:, s, None, None], -math.inf)
        cand_scores.append(sums)
        cand_ids.append(ids)
    scores = torch.cat(cand_scores, dim=-1)
    ids = torch.cat(cand_ids, dim=-1)
    if scores.shape[-1] < k:  # fewer experts than k: pad with -inf scores and id -1
        pad = k - scores.shape[-1]
        scores = F.pad(scores, (0, pad), value=-math.inf)
        ids = F.pad(ids, (0, pad), value=-1)
    scores, pick = scores.topk(k, dim=-1)
    return scores, ids.gather(-1, pick)


def _act(a: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(a) if activation == "gelu" else F.relu(a)


def _act_grad(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return (a > 0).to(a.dtype)
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + a * pdf


def row_sparse_grad(
    ids: torch.Tensor,
    coeffs: torch.Tensor,
    rhs: torch.Tensor,
    shape: torch.Size,
    frozen: torch.Tensor | None,
    sparse: bool,
) -> torch.Tensor:
    """Aggregate per-row gradients ``grad[r] = Σ_{(t,m): ids[t,m]=r} coeffs[t,m]·rhs[t]``.

    The sum runs as one sparse (rows × T) @ (T, C) product, so no (T·M, C)
    tensor of per-retrieval rows is materialised. Frozen rows are dropped.

    Args:
        ids: (T, M) int64 row ids.
        coeffs: (T, M) per-retrieval coefficients.
        rhs: (T, C) per-token vectors.
        shape: shape of the full table (N, C).
        frozen: optional (>= N,) bool mask of rows that get no gradient.
        sparse: return a coalesced sparse COO gradient instead of a dense one.

    Returns:
        (N, C) gradient, sparse COO (coalesced) or dense.
    """
    T, M = ids.shape
    flat = ids.reshape(-1)
    token = torch.arange(T, device=ids.device).repeat_interleave(M)
    vals = coeffs.reshape(-1)
    if frozen is not None:
        keep = ~frozen[flat]
        flat, token, vals = flat[keep], token[keep], vals[keep]
    rows, inverse = torch.unique(flat, return_inverse=True)
    mat = torch.sparse_coo_tensor(
        torch.stack([inverse, token]), vals, (rows.numel(), T), check_invariants=False
    )
    values = torch.sparse.mm(mat, rhs)  # (U, C)
    if sparse:
        return torch.sparse_coo_tensor(
            rows[None], values, shape, is_coalesced=True, check_invariants=False
        )
    return torch.zeros(shape, dtype=rhs.dtype, device=rhs.device).index_copy_(0, rows, values)


class _ExpertMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, gates, down, up, activation, frozen, sparse_grad):
        T = x.shape[0]
        flat_ids = ids.reshape(T, -1)  # (T, M), M = H*K
        flat_gates = gates.reshape(T, -1)
        u = F.embedding(flat_ids, down)  # (T, M, D)
        a = torch.bmm(u, x.unsqueeze(-1)).squeeze(-1)  # (T, M)
        w = _act(a, activation) * flat_gates  # (T, M)
        out = F.embedding_bag(flat_ids, up, per_sample_weights=w, mode="sum")  # (T, E)
        ctx.save_for_backward(x, flat_ids, flat_gates, down, up, a, frozen)
        ctx.activation, ctx.sparse_grad, ctx.gate_shape = activation, sparse_grad, gates.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, flat_ids, flat_gates, down, up, a, frozen = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        frozen = frozen if frozen.numel() else None
        h = _act(a, ctx.activation)
        v = F.embedding(flat_ids, up)  # (T, M, E)
        gv = torch.bmm(v, grad_out.unsqueeze(-1)).squeeze(-1)  # (T, M): g·v_i
        del v
        grad_gates = (gv * h).reshape(ctx.gate_shape) if ctx.needs_input_grad[2] else None
        da = gv * flat_gates * _act_grad(a, ctx.activation)  # (T, M)
        grad_x = None
        if ctx.needs_input_grad[0]:
            u = F.embedding(flat_ids, down)  # (T, M, D)
            grad_x = torch.bmm(da.unsqueeze(1), u).squeeze(1)
        grad_down = grad_up = None
        if ctx.needs_input_grad[3]:
            grad_down = row_sparse_grad(flat_ids, da, x, down.shape, frozen, ctx.sparse_grad)
        if ctx.needs_input_grad[4]:
            grad_up = row_sparse_grad(
                flat_ids, h * flat_gates, grad_out, up.shape, frozen, ctx.sparse_grad
            )
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
        ids: (T, H, K) int64 expert ids (rows of ``down`` and ``up``).
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
