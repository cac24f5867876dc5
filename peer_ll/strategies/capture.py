"""Capture the inputs of a model's PEER layers, and recompute their routing.

Plugins that need a layer's routing register forward hooks with :class:`PEERInputs`
and recompute queries or top-k ids from the captured input with the layer's public
``query``/``retrieve``. That costs one more query and search per layer and step. A
BatchNorm query norm is held still while recomputing (momentum 0), so it normalises
with the same batch statistics as the forward did and its running statistics move
only once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peer_ll.experts import PEER, peer_layers


class PEERInputs:
    """Forward hooks that keep the latest input (and owners) of each PEER layer.

    Args:
        model: the model whose PEER layers to watch.

    Attributes:
        layers: the watched layers, in module order.
        inputs: ``{layer: (x (..., D), owners)}`` of the forwards run while ``active``.
        active: record only while True.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = list(peer_layers(model).values())
        self.inputs: dict[PEER, tuple[torch.Tensor, object]] = {}
        self.active = False
        watched = set(map(id, self.layers))

        def hook(layer, args, kwargs, output):
            # Hooks travel with copy.deepcopy: record only the watched layers themselves.
            if self.active and id(layer) in watched:
                owners = args[1] if len(args) > 1 else kwargs.get("owners")
                self.inputs[layer] = (args[0], owners)

        self._handles = [
            layer.register_forward_hook(hook, with_kwargs=True) for layer in self.layers
        ]

    @contextlib.contextmanager
    def recording(self) -> Iterator[PEERInputs]:
        """Record the forwards run inside the block (clearing earlier records)."""
        self.inputs, self.active = {}, True
        try:
            yield self
        finally:
            self.active = False

    def remove(self) -> None:
        """Remove the hooks and drop the records."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.inputs, self.active = [], {}, False


@contextlib.contextmanager
def still_batch_stats(layer: PEER) -> Iterator[None]:
    """Inside the block, a BatchNorm query norm does not update its running statistics."""
    norm = layer.query_norm
    if not isinstance(norm, nn.BatchNorm1d):
        yield
        return
    momentum = norm.momentum
    norm.momentum = 0.0
    try:
        yield
    finally:
        norm.momentum = momentum


def recompute_query(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """The layer's queries for input ``x``, as its forward computed them: (..., D) -> (T, H, d)."""
    with still_batch_stats(layer):
        return layer.query(x).reshape(-1, layer.heads, layer.dim_key)


def recompute_ids(layer: PEER, x: torch.Tensor, owners=None, *, k: int | None = None):
    """The layer's top-k ids for input ``x``: (..., D) -> (T, H, k) int64, -1 where missing."""
    with still_batch_stats(layer), torch.no_grad():
        _, ids = layer.retrieve(x, owners, k=k)
    return ids.reshape(-1, layer.heads, ids.shape[-1])
