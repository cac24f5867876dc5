"""Product-key top-k retrieval over all segments of a PEER pool.

The public function dispatches to the Triton kernel or to the torch reference.
"""

from __future__ import annotations

import torch

from peer_ll.kernels import reference
from peer_ll.kernels.backend import resolve_backend


def product_topk(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    segments: torch.Tensor,
    k: int,
    *,
    segment_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k product-key retrieval; see ``reference.product_topk`` for shapes."""
    if resolve_backend(backend, queries, sub_keys) == "triton":
        raise RuntimeError("the Triton product_topk kernel is not available in this build")
    return reference.product_topk(queries, sub_keys, segments, k, segment_mask=segment_mask)
