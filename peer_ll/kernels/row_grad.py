"""Row-sparse gradients of gathered tables: plan once, aggregate per row.

A table row ``r`` (an expert's ``u``/``v``, or a sub-key) gathered at places
``(t, m)`` with ``ids[t, m] == r`` gets the gradient ``Σ coeffs[t, m] · rhs[t]``.
:func:`row_plan` sorts the places by row once; the aggregation then runs per row
in sorted order, so it is deterministic, and one plan serves several tables
retrieved with the same ids (``down`` and ``up``). Frozen rows are dropped from
the plan, so they get no gradient at all.

Axis letters: ``T`` gathering positions, ``M`` gathers per position, ``P`` kept
places (``<= T·M``), ``U`` distinct rows among them, ``C`` row width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RowPlan(NamedTuple):
    """Places grouped by row, in ascending row order.

    Attributes:
        rows: (U,) int64 distinct unfrozen rows, ascending.
        offsets: (U + 1,) int64; the places of ``rows[u]`` are
            ``order[offsets[u] : offsets[u + 1]]``.
        order: (P,) int64 flat place indices ``t * M + m``, grouped by row.
        slots: (P,) int64 ``u`` of each entry of ``order`` (its row's slot).
        width: M, the number of gathers per position.
    """

    rows: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    slots: torch.Tensor
    width: int


def row_plan(ids: torch.Tensor, frozen: torch.Tensor | None = None) -> RowPlan:
    """Group the places of ``ids`` (T, M) by row, leaving out frozen rows.

    Args:
        ids: (T, M) int64 row ids; places with id -1 (no row) are left out.
        frozen: optional (>= max id + 1,) bool mask of rows that get no gradient.

    Returns:
        The :class:`RowPlan`.
    """
    flat = ids.reshape(-1)
    if ids.numel() and int(ids.max()) < 2**31:  # int32 keys sort faster
        flat = flat.to(torch.int32)
    sorted_ids, order = torch.sort(flat, stable=True)
    first = int((sorted_ids < 0).sum())  # ids of -1 (no expert) sort first
    sorted_ids, order = sorted_ids[first:], order[first:]
    if frozen is not None and frozen.numel():
        keep = ~frozen[sorted_ids]
        sorted_ids, order = sorted_ids[keep], order[keep]
    rows, slots, counts = torch.unique_consecutive(
        sorted_ids, return_inverse=True, return_counts=True
    )
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    return RowPlan(rows.long(), offsets, order, slots, ids.shape[-1])


def aggregate_rows(
    plan: RowPlan,
    coeffs: torch.Tensor,
    rhs: torch.Tensor,
    *,
    backend: str = "torch",
    deterministic: bool = True,
) -> torch.Tensor:
    """Per-row sums ``values[u] = Σ_{p in row u} coeffs.flat[p] · rhs[p // M]``.

    The torch path is one ``embedding_bag`` over the sorted places: no (P, C)
    tensor is built. The Triton path sums each row in sorted order, or with fp32
    atomics when ``deterministic=False``.

    Args:
        plan: from :func:`row_plan`.
        coeffs: (T, M) per-place coefficients.
        rhs: (T, C) per-position vectors.
        backend: "torch" or "triton" (already resolved).
        deterministic: Triton only: sorted sums (True) or atomics (False).

    Returns:
        (U, C) values, in ``rhs``'s dtype.
    """
    if backend == "triton":
        from peer_ll.kernels._rows_triton import aggregate_rows_triton

        return aggregate_rows_triton(plan, coeffs, rhs, deterministic=deterministic)
    if plan.order.numel() == 0:
        return rhs.new_zeros(0, rhs.shape[-1])
    weights = coeffs.reshape(-1)[plan.order].to(rhs.dtype)
    return F.embedding_bag(
        plan.order // plan.width, rhs, plan.offsets[:-1], mode="sum", per_sample_weights=weights
    )


def to_table_grad(
    plan: RowPlan, values: torch.Tensor, shape: torch.Size | tuple, *, sparse: bool
) -> torch.Tensor:
    """Place per-row ``values`` (U, C) into an (N, C) gradient, COO (coalesced) or dense."""
    if sparse:
        return torch.sparse_coo_tensor(
            plan.rows[None], values, tuple(shape), is_coalesced=True, check_invariants=False
        )
    return values.new_zeros(tuple(shape)).index_copy_(0, plan.rows, values)


def row_sparse_grad(
    ids: torch.Tensor,
    coeffs: torch.Tensor,
    rhs: torch.Tensor,
    shape: torch.Size | tuple,
    frozen: torch.Tensor | None,
    sparse: bool,
) -> torch.Tensor:
    """``grad[r] = Σ_{(t,m): ids[t,m]=r} coeffs[t,m]·rhs[t]``, frozen rows left out (torch).

    Args:
        ids: (T, M) int64 row ids.
        coeffs: (T, M) per-place coefficients.
        rhs: (T, C) per-position vectors.
        shape: shape of the full table (N, C).
        frozen: optional (>= N,) bool mask of rows that get no gradient.
        sparse: return a coalesced sparse COO gradient instead of a dense one.

    Returns:
        (N, C) gradient, sparse COO (coalesced) or dense.
    """
    plan = row_plan(ids, frozen)
    return to_table_grad(plan, aggregate_rows(plan, coeffs, rhs), shape, sparse=sparse)


_DENSE_KEY_GRAD_ELEMENTS = 1 << 25  # (T·H, R) sub-key coefficients up to 128 MiB in fp32


def key_table_grad(
    ids: torch.Tensor, coeffs: torch.Tensor, rhs: torch.Tensor, rows: int, frozen: torch.Tensor
) -> torch.Tensor:
    """Dense (R, d/2) gradient of one side of the sub-keys, frozen rows zero.

    Grouping the T·H·K places by row (one sort, one ``embedding_bag``) costs
    O(T·H·K·d); a (T·H, R) coefficient matrix and one matrix product cost O(T·H·R·d),
    which is less only when R is within a few K (measured: at R = 1024, K = 16 the
    grouping is 4x faster).
    """
    if rows <= 4 * ids.shape[1] and ids.shape[0] * rows <= _DENSE_KEY_GRAD_ELEMENTS:
        weights = rhs.new_zeros(ids.shape[0], rows).scatter_add_(1, ids, coeffs.to(rhs.dtype))
        grad = weights.T @ rhs  # (R, d/2)
        return grad.masked_fill_(frozen[:, None], 0.0) if frozen.numel() else grad
    plan = row_plan(ids, frozen)
    values = aggregate_rows(plan, coeffs, rhs)
    return to_table_grad(plan, values, (rows, rhs.shape[-1]), sparse=False)
