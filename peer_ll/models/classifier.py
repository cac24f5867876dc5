"""A classifier with PEER blocks, for class-, task- and domain-incremental streams.

``PEERClassifier``: flatten → Linear encoder (GELU) → residual PEER blocks
``x + PEER(LayerNorm(x))`` → LayerNorm → head. The head is a ``Linear`` layer with
``num_classes`` outputs unless another module is given (e.g. Avalanche's
``IncrementalClassifier``: :func:`peer_ll.strategies.peer_classifier` builds that).

The model is plain torch. Its pools grow only when something grows them:
``peer_ll.strategies.attach_growth(model)`` (done by the ``peer_ll.strategies``
factories) for Avalanche streams, or ``layer.grow(...)`` by hand. ``growth`` says how
grown experts are reached: "owner" (default) keeps ``forward(x, owners=...)``, so the
per-owner methods (``peer_ll.protect``) can restrict retrieval to an owner's experts;
"pool" is the paper's literal growth: one top-k over every expert, no task label and no
owner inference (``owners`` is refused), grown by
:func:`peer_ll.strategies.pool_growth_plugin.peer_grow_pool`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from peer_ll.experts import PEER, Owners, call_with_owners
from peer_ll.experts.checks import check_choice, check_int, check_type

#: PEER settings of the classifier, smaller than the paper's language-model layer.
PEER_DEFAULTS: dict[str, Any] = dict(
    num_keys=16,  # 256 experts per segment (paper: 1024² in a language model)
    heads=4,  # paper: 8
    topk=8,  # paper: 16
    dim_key=32,  # paper: 128
    # paper: BatchNorm. LayerNorm lets a mini-batch hold one sample (Avalanche's
    # default train_mb_size is 1) and makes queries independent of the batch.
    query_norm="layer",
)
#: How grown experts are reached (see the module docstring).
GROWTH = ("owner", "pool")


class PEERBlock(nn.Module):
    """Pre-norm residual PEER block: ``x + PEER(LayerNorm(x))``, (..., D) -> (..., D)."""

    takes_owners = True

    def __init__(self, dim: int, **peer: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.peer = PEER(dim, **peer)

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        return x + self.peer(call_with_owners(self.norm, x, owners), owners=owners)


class PEERClassifier(nn.Module):
    """Encoder, residual PEER blocks and a head.

    Args:
        in_features: size of a flattened input sample.
        num_classes: number of output units of the default ``Linear`` head.
        hidden: width D of the encoder and the PEER blocks.
        blocks: number of PEER blocks.
        peer: PEER keyword arguments, over :data:`PEER_DEFAULTS` (e.g.
            ``{"num_keys": 8, "query_norm": "layer"}``); not ``dim``/``dim_out``.
        head: a module mapping features (B, hidden) to logits (B, classes); default
            ``Linear(hidden, num_classes)``. An owner-aware head (``takes_owners``)
            gets the ``owners`` of :meth:`forward`.
        growth: "owner" (owners may restrict retrieval) or "pool" (one retrieval over
            every expert; :meth:`forward` refuses ``owners``).

    Shapes:
        input (B, *) with ``in_features`` values per sample -> logits (B, classes).
    """

    takes_owners = True  # forward(x, owners=None); see peer_ll.experts.call_with_owners

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: int = 128,
        blocks: int = 1,
        peer: Mapping[str, Any] | None = None,
        head: nn.Module | None = None,
        growth: str = "owner",
    ) -> None:
        super().__init__()
        check_choice("growth", growth, GROWTH)
        for name, value in (
            ("in_features", in_features),
            ("num_classes", num_classes),
            ("hidden", hidden),
            ("blocks", blocks),
        ):
            check_int(name, value, minimum=1)
        if isinstance(head, str):
            raise TypeError(
                f"head must be an nn.Module or None, got the string {head!r}: build Avalanche "
                "heads with peer_ll.strategies.peer_classifier(..., head=...)"
            )
        if head is not None:
            check_type("head", head, nn.Module)
        if peer is not None:
            check_type("peer", peer, Mapping)
        peer = dict(peer or {})
        if {"dim", "dim_out"} & peer.keys():
            raise ValueError(f"peer must not set dim or dim_out (use hidden), got {sorted(peer)}")
        self.in_features, self.num_classes, self.growth = in_features, num_classes, growth
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU())
        self.blocks = nn.ModuleList(
            PEERBlock(hidden, **{**PEER_DEFAULTS, **peer}) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes) if head is None else head

    @property
    def peer_layers(self) -> list[PEER]:
        """The PEER layers, one per block."""
        return [block.peer for block in self.blocks]

    def features(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """(B, *) -> (B, hidden) features before the head; ``owners`` as in :meth:`forward`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x[0].numel() != self.in_features:
            raise ValueError(
                f"x must have shape (B, ...) with {self.in_features} values per "
                f"sample, got {tuple(x.shape)}"
            )
        if owners is not None and self.growth == "pool":
            raise ValueError(
                "owners must be None for a model with growth='pool' (one retrieval over "
                f"every expert), got {owners!r}"
            )
        h = x
        for layer in self.encoder:  # an owner-aware layer (e.g. per-owner) gets the owners
            h = call_with_owners(layer, h, owners)
        for block in self.blocks:
            h = block(h, owners=owners)
        return call_with_owners(self.norm, h, owners)

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """(B, *) -> logits (B, classes).

        Args:
            x: (B, *) inputs.
            owners: passed to every owner-aware submodule (the PEER blocks, and the
                head if it takes owners): None (every expert), an int, a sequence of
                ints, or a (B,) integer tensor with one owner per input. Only None
                with ``growth="pool"``.
        """
        return call_with_owners(self.head, self.features(x, owners), owners)
