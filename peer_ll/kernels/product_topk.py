"""Product-key top-k retrieval over all segments of a PEER pool.

The Triton kernel takes a block of ``BLOCK_Q`` query rows (rows are (token,
head) pairs, so a block holds whole tokens with all their heads when
``BLOCK_Q`` is a multiple of H) and, for every segment:

1. scores the segment's left sub-keys in tiles of ``BLOCK_R`` (one ``tl.dot``
   per tile) and keeps a running top-k of them in registers; the same for the
   right sub-keys;
2. forms the k_l·k_r candidate sums of the two lists (in chunks of left ranks,
   so k = 64 fits in registers) and keeps their top-k;
3. merges that into the running top-k over segments.

Only the final top-k scores and expert ids are written. A score and its id
travel together as one int64 (order-preserving score bits above, id below), so
``tl.topk`` on the packed values selects both. Retrieval is not differentiable:
the layer recomputes the scores of the selected experts with
:mod:`peer_ll.kernels.selected_scores`.
"""

from __future__ import annotations

import torch

from peer_ll.kernels import _native_topk, reference
from peer_ll.kernels.backend import COMPILED_MAX_K, resolve_backend


def product_topk(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    segments: torch.Tensor,
    k: int,
    *,
    segment_mask: torch.Tensor | None = None,
    backend: str = "auto",
    select: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k product-key retrieval over every segment (not differentiable).

    Args:
        queries: (T, H, d) queries, d even.
        sub_keys: (R, 2, d/2) sub-key table; ``[:, 0]`` left halves, ``[:, 1]`` right.
        segments: (S, 4) int64 ``[key_offset, n_left, n_right, expert_offset]`` rows.
        k: experts per token and head. The compiled Triton kernel takes k <= 16 ("auto"
            uses the torch path for larger k on CUDA); the interpreter takes k <= 64.
        segment_mask: optional (T, S) bool; False excludes a segment for a token.
        backend: "auto" (Triton on CUDA tensors; on CPU the torch path with the C row
            top-k of :mod:`peer_ll.kernels._native_topk` where it builds), "torch" (pure
            torch) or "triton".
        select: Triton only: how the kernel selects top-k, "bitonic" (``tl.topk``,
            the GPU default) or "extract" (k row maxima; interpreter only).

    Returns:
        scores (T, H, k) sorted descending, and ids (T, H, k) int64. Places without
        an expert score ``-inf`` with id -1.
    """
    if queries.dim() != 3 or queries.shape[-1] % 2:
        raise ValueError(
            f"queries must have shape (T, H, d) with d even, got {tuple(queries.shape)}"
        )
    if segments.dim() != 2 or segments.shape[1] != 4 or len(segments) == 0:
        raise ValueError(
            f"segments must have shape (S, 4) with S >= 1, got {tuple(segments.shape)}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if segment_mask is not None and tuple(segment_mask.shape) != (queries.shape[0], len(segments)):
        raise ValueError(
            f"segment_mask must have shape {(queries.shape[0], len(segments))}, "
            f"got {tuple(segment_mask.shape)}"
        )
    if queries.shape[0] == 0:
        empty = queries.new_empty(0, queries.shape[1], k)
        return empty, empty.to(torch.int64)
    with torch.no_grad():
        chosen = resolve_backend(backend, queries, sub_keys)
        if chosen == "triton" and backend == "auto" and k > COMPILED_MAX_K:
            chosen = "torch"
        if chosen == "triton":
            from peer_ll.kernels._topk_triton import product_topk_triton

            return product_topk_triton(queries, sub_keys, segments, k, segment_mask, select=select)
        topk = _cpu_topk if backend == "auto" and _native_topk.load() is not None else None
        return reference.product_topk(
            queries, sub_keys, segments, k, segment_mask=segment_mask, topk=topk
        )


def _cpu_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C row top-k where it takes ``x`` (CPU fp32), else ``torch.topk``."""
    return _native_topk.row_topk(x, k) if _native_topk.fits(x, k) else x.topk(k, dim=-1)
