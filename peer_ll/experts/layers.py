"""Finding the PEER layers of a model: the one helper that lists them."""

from __future__ import annotations

from torch import nn

from peer_ll.experts.checks import check_type
from peer_ll.experts.peer import PEER


def peer_layers(model: nn.Module) -> dict[str, PEER]:
    """Every PEER layer inside ``model`` (itself included), by module name.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: it holds no PEER layer.
    """
    check_type("model", model, nn.Module)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PEER)}
    if not layers:
        raise ValueError(
            f"model must contain PEER layers, got a {type(model).__name__} without any"
        )
    return layers
