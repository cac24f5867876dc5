"""PEER's query network: a linear map, then the query norm (paper: BatchNorm).

Axis letters: ``T`` tokens, ``H`` heads, ``d`` dim_key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_query_norm(kind: str | None, heads: int, dim_key: int) -> nn.Module:
    """BatchNorm over all heads' queries (paper), LayerNorm per head, or the identity."""
    if kind == "batch":
        return nn.BatchNorm1d(heads * dim_key)
    return nn.LayerNorm(dim_key) if kind == "layer" else nn.Identity()


def normed_query(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A PEER ``layer``'s queries (..., H, d) of inputs x (..., D) in its dtype.

    A frozen query network's BatchNorm uses its running statistics, also in training.
    LayerNorm (``query_norm="layer"``) is applied per head.

    Raises:
        ValueError: one input in training with BatchNorm (it needs batch statistics).
    """
    lead, shape = x.shape[:-1], (layer.heads, layer.dim_key)
    if x.numel() == 0:
        return x.new_zeros(*lead, *shape)
    norm, kind = layer.query_norm, layer.query_norm_kind
    q = layer.to_query(x.reshape(-1, layer.dim))  # (T, H*d)
    if kind == "batch":
        training = norm.training and not layer.query_frozen
        if training and q.shape[0] == 1:
            raise ValueError(
                "x must hold more than one input in training with query_norm='batch' "
                "(BatchNorm needs batch statistics), got 1: use a larger batch (e.g. "
                "Avalanche's train_mb_size > 1) or PEER(..., query_norm='layer')"
            )
        stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
        q = F.batch_norm(q, *stats, training, norm.momentum, norm.eps)
    q = q.view(*lead, *shape)
    return norm(q) if kind == "layer" else q
