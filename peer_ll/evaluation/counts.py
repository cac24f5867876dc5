"""Total and active parameter counts of a continual-learning model with PEER layers.

``peer-ll run``'s Params and Active columns. (Adapters on a Hugging Face model count with
:func:`peer_ll.adapters.counts.parameter_counts`, PEFT's way.)
"""

from __future__ import annotations

from torch import nn

from peer_ll.experts import PEER, per_owner_modules


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Total and active parameters of a model with PEER layers.

    Total counts the live rows of each PEER table (``num_experts`` expert rows,
    ``num_sub_keys`` sub-key rows), not reserved capacity. Active counts what one
    input uses: everything outside the expert tables (all sub-keys are scored) plus
    ``min(N, heads · topk)`` experts per PEER layer, and of each per-owner module
    (``peer_ll.protect.PerOwner`` heads, encoder layers and norms, PEER query adapters) only
    its largest copy: an input runs through one owner's (owner-restricted retrieval).

    Returns:
        ``(total, active)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    live = {}
    inactive = 0
    for layer in (m for m in model.modules() if isinstance(m, PEER)):
        n = layer.num_experts
        live[id(layer.down)] = n * layer.dim
        live[id(layer.up)] = n * layer.dim_out
        live[id(layer.sub_keys)] = layer.num_sub_keys * layer.dim_key
        inactive += (n - min(n, layer.heads * layer.topk)) * (layer.dim + layer.dim_out)
    for copies in _per_owner_copies(model):
        sizes = [sum(p.numel() for p in m.parameters()) for m in copies.values()]
        inactive += sum(sizes) - max(sizes, default=0)
    total = sum(live.get(id(p), p.numel()) for p in model.parameters())
    return total, total - inactive


def _per_owner_copies(model: nn.Module) -> list[nn.ModuleDict]:
    """The ``{owner: module}`` dicts of a model's per-owner modules (keys: owner ids).

    ``peer_ll.experts.PerOwner`` copies (heads, encoder copies, query adapters); not
    Avalanche's multi-head classifiers, whose ModuleDict is keyed by task labels too.
    """
    return [m.copies for m in per_owner_modules(model)]
