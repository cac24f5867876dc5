"""Autograd collectives and local kernels of a column-sharded PEER layer.

Rank ``r`` of ``W`` holds columns ``[r·D/W, (r+1)·D/W)`` of ``down`` and
``[r·E/W, (r+1)·E/W)`` of ``up`` (all rows). Inputs are data-parallel: rank ``r`` holds
``T_r`` tokens of the global batch of ``T = Σ T_r`` tokens, retrieves for them with its
replicated query network and sub-keys, and then (:func:`sharded_mix`):

1. ``ids`` (T, M) (as int32) and ``G`` gates (T, M) are all-gathered (``M = H·K``);
2. ``Xc = x[:, cols_r]`` of all T tokens arrives by one all-to-all (T, D/W);
3. ``h = all_reduce(<down[ids, cols_r], Xc>)``: the exact dots, only T·M scalars;
4. ``y[:, cols_r] = Σ_m act(h)·G · up[ids, cols_r]`` (T, E/W), and one all-to-all
   returns each rank its own tokens' full rows (T_r, E).

Gradient convention (as DDP's): rank ``r``'s loss is ``L_r``, the mean over its tokens,
and the model's loss is ``L = (1/W) Σ_r L_r``. Data-parallel tensors (inputs, gates,
outputs of rank ``r``) carry ``∂L_r/∂· = W·∂L/∂·``; shared ones (``Xc``, ``h``, the
column blocks) carry ``∂L/∂·`` exactly. So the local table blocks get the gradient of
``L`` (no averaging: they must be left out of DDP), the replicated parameters get
DDP-style gradients that the usual averaging turns into those of ``L``.

Every collective adds the bytes this rank sends to :data:`TRAFFIC` and its time to
:data:`SECONDS`.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from peer_ll.kernels.reference import activate, gather_dot
from peer_ll.kernels.row_grad import row_sparse_grad

#: Bytes this process sent, by collective (``TRAFFIC.clear()`` to restart counting).
TRAFFIC: Counter = Counter()
#: Host seconds this process spent in those collectives, waiting for the others included
#: (on CUDA, NCCL calls return before the transfer ends: there it measures little).
SECONDS: Counter = Counter()


@contextmanager
def _collective(op: str, tensor: torch.Tensor, share: float = 1.0):
    TRAFFIC[op] += int(tensor.numel() * tensor.element_size() * share)
    start = time.perf_counter()
    yield
    SECONDS[op] += time.perf_counter() - start


def token_counts(n: int, device: torch.device, group) -> list[int]:
    """Tokens ``T_s`` of every rank of ``group`` (collective)."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    with _collective("all_gather", mine, len(out) - 1):
        dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


def gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All ranks' rows in rank order: (T_r, C) -> (Σ T_s, C) (padded all-gather)."""
    width = max(sizes)
    padded = x.new_zeros(width, *x.shape[1:])
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    with _collective("all_gather", padded, len(sizes) - 1):
        dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


def rows_to_cols(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All-to-all: own rows, all columns (T_r, W·C) -> all rows, own columns (Σ T_s, C)."""
    world = len(sizes)
    rows, cols = x.shape[0], x.shape[1] // world
    send = x.reshape(rows, world, cols).transpose(0, 1).reshape(world * rows, cols)
    recv = x.new_empty(sum(sizes), cols)
    with _collective("all_to_all", send, (world - 1) / world):
        dist.all_to_all_single(recv, send, sizes, [rows] * world, group=group)
    return recv


def cols_to_rows(y: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """All-to-all: all rows, own columns (Σ T_s, C) -> own rows, all columns (T_r, W·C)."""
    world = len(sizes)
    rows, cols = sizes[rank], y.shape[1]
    recv = y.new_empty(world * rows, cols)
    y = y.contiguous()
    with _collective("all_to_all", y, (world - 1) / world):
        dist.all_to_all_single(recv, y, [rows] * world, sizes, group=group)
    return recv.view(world, rows, cols).transpose(0, 1).reshape(rows, world * cols)


def _own_rows(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


class _GatherRows(torch.autograd.Function):
    """Forward all-gather of rows; backward: own rows times W (data-parallel convention)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank = sizes, rank
        return gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.sizes, ctx.rank) * len(ctx.sizes), None, None, None


class _RowsToCols(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return rows_to_cols(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # the exact gradient, times W for the owner's convention
        out = cols_to_rows(grad, ctx.sizes, ctx.rank, ctx.group) * len(ctx.sizes)
        return out, None, None, None


class _ColsToRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        return cols_to_rows(y, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):  # ∂L_r/∂y_r = W·∂L/∂y_r: back to the exact gradient
        return rows_to_cols(grad.contiguous(), ctx.sizes, ctx.group) / len(ctx.sizes), *[None] * 3


class _SumPartials(torch.autograd.Function):
    """Forward all-reduce (sum of per-shard partial dots), backward identity."""

    @staticmethod
    def forward(ctx, partial, group):
        out, world = partial.clone(), dist.get_world_size(group)
        with _collective("all_reduce", out, 2 * (world - 1) / world):
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ToShards(torch.autograd.Function):
    """Forward identity, backward all-reduce (each shard sees a part of the gradient)."""

    @staticmethod
    def forward(ctx, a, group):
        ctx.group = group
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        world = dist.get_world_size(ctx.group)
        with _collective("all_reduce", grad, 2 * (world - 1) / world):
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _LocalDot(torch.autograd.Function):
    """``partial[t, m] = down[ids[t, m]] · xc[t]`` for one column block."""

    @staticmethod
    def forward(ctx, xc, ids, down, frozen, sparse):
        ctx.save_for_backward(xc, ids, down, frozen)
        ctx.sparse = sparse
        return gather_dot(ids, down, xc)

    @staticmethod
    def backward(ctx, grad):
        xc, ids, down, frozen = ctx.saved_tensors
        grad = grad.to(down.dtype).contiguous()
        grad_x = grad_down = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(ids, down, per_sample_weights=grad, mode="sum").to(xc.dtype)
        if ctx.needs_input_grad[2]:
            rhs = xc.to(down.dtype)
            grad_down = row_sparse_grad(ids, grad, rhs, down.shape, frozen, ctx.sparse)
        return grad_x, None, grad_down, None, None


class _LocalUp(torch.autograd.Function):
    """``y[t] = Σ_m a[t, m] · up[ids[t, m]]`` for one column block."""

    @staticmethod
    def forward(ctx, a, ids, up, frozen, sparse):
        ctx.save_for_backward(a, ids, up, frozen)
        ctx.sparse = sparse
        return F.embedding_bag(ids, up, per_sample_weights=a.to(up.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad):
        a, ids, up, frozen = ctx.saved_tensors
        grad = grad.to(up.dtype).contiguous()
        grad_a = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_a = gather_dot(ids, up, grad).to(a.dtype)
        if ctx.needs_input_grad[2]:
            grad_up = row_sparse_grad(ids, a.to(up.dtype), grad, up.shape, frozen, ctx.sparse)
        return grad_a, None, grad_up, None, None


def sharded_mix(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    *,
    sizes: list[int],
    rank: int,
    group=None,
    activation: str = "gelu",
    frozen: torch.Tensor | None = None,
    sparse_grad: bool = True,
) -> torch.Tensor:
    """Expert mixing with column-sharded tables (collective: every rank of ``group`` calls it).

    Args:
        x: (T_r, D) this rank's inputs.
        ids: (T_r, M) int64 expert ids retrieved for them (M = H·K), all valid.
        gates: (T_r, M) their gates.
        down: (N, D/W) this rank's column block of ``down``.
        up: (N, E/W) this rank's column block of ``up``.
        sizes: tokens ``T_s`` of every rank (:func:`token_counts`).
        rank: this process's rank in ``group``.
        group: the process group the tables are sharded over (default: the world).
        activation: "gelu" or "relu".
        frozen: optional (N,) bool: rows that get no gradient.
        sparse_grad: row-sparse (COO) table gradients.

    Returns:
        (T_r, E) outputs of this rank's tokens.
    """
    if frozen is None:
        frozen = torch.empty(0, dtype=torch.bool, device=x.device)
    narrow = down.shape[0] < 2**31  # int32 ids halve their share of the traffic
    all_ids = gather_rows(ids.to(torch.int32) if narrow else ids, sizes, group).long()  # (T, M)
    all_gates = _GatherRows.apply(gates, sizes, rank, group)  # (T, M)
    xc = _RowsToCols.apply(x, sizes, rank, group)  # (T, D/W)
    h = _SumPartials.apply(_LocalDot.apply(xc, all_ids, down, frozen, sparse_grad), group)
    a = _ToShards.apply(activate(h, activation) * all_gates, group)  # (T, M)
    y = _LocalUp.apply(a, all_ids, up, frozen, sparse_grad)  # (T, E/W)
    return _ColsToRows.apply(y, sizes, rank, group)  # (T_r, E)
