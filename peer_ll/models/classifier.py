"""A classifier with PEER blocks, for class-, task- and domain-incremental streams.

``PEERClassifier``: flatten → Linear encoder (GELU) → residual PEER blocks
``x + PEER(LayerNorm(x))`` → LayerNorm → head. The head is one of:

- "incremental": Avalanche's ``IncrementalClassifier``, which adds output units as
  new classes arrive (class-incremental streams);
- "multihead": Avalanche's ``MultiHeadClassifier``, one head per task label
  (task-incremental streams); the model is then an Avalanche ``MultiTaskModule``,
  so strategies pass the task labels to ``forward(x, task_labels)``;
- "fixed": a ``Linear`` layer with ``num_classes`` outputs (domain-incremental).

Every PEER layer grows per experience by a ``peer_ll.strategies.GrowthPolicy``, in
any Avalanche strategy. Avalanche, and the peer_ll Avalanche glue, are imported
when a classifier is built, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from peer_ll.experts import PEER

HEADS = ("incremental", "multihead", "fixed")

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


class PEERBlock(nn.Module):
    """Pre-norm residual PEER block: ``x + PEER(LayerNorm(x))``, (..., D) -> (..., D)."""

    def __init__(self, dim: int, **peer: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.peer = PEER(dim, **peer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.peer(self.norm(x))


class PEERClassifier(nn.Module):
    """Encoder, residual PEER blocks and a head, for Avalanche streams.

    Args:
        in_features: size of a flattened input sample.
        num_classes: initial number of output units (the "incremental" and
            "multihead" heads add units for new classes).
        hidden: width D of the encoder and the PEER blocks.
        blocks: number of PEER blocks.
        peer: PEER keyword arguments, over :data:`PEER_DEFAULTS` (e.g.
            ``{"num_keys": 8, "sparse_grad": False}``); not ``dim``/``dim_out``.
        head: "incremental", "multihead" or "fixed".
        growth: the ``peer_ll.strategies.GrowthPolicy`` of every PEER layer
            (default: ``GrowthPolicy()``, one segment per new experience, earlier
            owners frozen); ``GrowthPolicy(when="never")`` keeps the pool fixed.

    Shapes:
        input (B, *) with ``in_features`` values per sample -> logits (B, classes).
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is PEERClassifier and kwargs.get("head") == "multihead":
            cls = _multihead_class()
        return super().__new__(cls)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: int = 128,
        blocks: int = 1,
        peer: Mapping[str, Any] | None = None,
        head: str = "incremental",
        growth=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("num_classes", num_classes),
            ("hidden", hidden),
            ("blocks", blocks),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if peer is not None and not isinstance(peer, Mapping):
            raise TypeError(f"peer must be a mapping of PEER arguments, got {type(peer).__name__}")
        peer = dict(peer or {})
        if {"dim", "dim_out"} & peer.keys():
            raise ValueError(f"peer must not set dim or dim_out (use hidden), got {sorted(peer)}")
        self.in_features, self.num_classes, self.head_kind = in_features, num_classes, head
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU())
        self.blocks = nn.ModuleList(
            PEERBlock(hidden, **{**PEER_DEFAULTS, **peer}) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = _make_head(head, hidden, num_classes)
        from peer_ll.strategies.growth import attach_growth  # Avalanche glue, at build time

        attach_growth(self, growth)

    @property
    def peer_layers(self) -> list[PEER]:
        """The PEER layers, one per block."""
        return [block.peer for block in self.blocks]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *) -> (B, hidden) features before the head."""
        if x.dim() < 2 or x[0].numel() != self.in_features:
            raise ValueError(
                f"x must have shape (B, ...) with {self.in_features} values per sample, "
                f"got {tuple(x.shape)}"
            )
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *) -> logits (B, classes)."""
        return self.head(self.features(x))


def _make_head(kind: str, hidden: int, num_classes: int) -> nn.Module:
    if kind == "fixed":
        return nn.Linear(hidden, num_classes)
    from avalanche.models import IncrementalClassifier, MultiHeadClassifier

    if kind == "incremental":
        return IncrementalClassifier(hidden, initial_out_features=num_classes)
    return MultiHeadClassifier(hidden, initial_out_features=num_classes)


_MULTIHEAD: type | None = None


def _multihead_class() -> type:
    """The multi-head classifier class, built on first use so Avalanche loads lazily."""
    global _MULTIHEAD
    if _MULTIHEAD is None:
        from avalanche.models import MultiTaskModule

        class MultiHeadPEERClassifier(PEERClassifier, MultiTaskModule):
            """A :class:`PEERClassifier` with ``head="multihead"``: an Avalanche MultiTaskModule."""

            def forward(self, x: torch.Tensor, task_labels=None):
                """(B, *), task labels (B,) or int -> logits; None -> {task: logits}."""
                return self.head(self.features(x), task_labels)

        MultiHeadPEERClassifier.__qualname__ = "MultiHeadPEERClassifier"
        MultiHeadPEERClassifier.__module__ = __name__
        _MULTIHEAD = MultiHeadPEERClassifier
    return _MULTIHEAD


def __getattr__(name: str):
    # Lets pickle find the lazily built class by name.
    if name == "MultiHeadPEERClassifier":
        return _multihead_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
