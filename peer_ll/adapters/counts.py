"""Parameter counts of a model with PEER branches, as PEFT's ``print_trainable_parameters``."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

_TABLES = ("pool.down", "pool.up", "pool.sub_keys")  # a PEER layer's expert and sub-key tables


def parameter_counts(
    model: nn.Module, branches: Iterable[nn.Module], low_rank: Iterable[nn.Module] = ()
) -> dict[str, int]:
    """{"trainable", "added", "total"} parameters of ``model`` with PEER ``branches``
    and per-owner ``low_rank`` deltas.

    trainable: parameters that train now; added: what the experts added (expert
    rows and sub-keys in use, query networks); total: the base model's + added.
    Frozen or spare (capacity) rows of the expert tables do not count as trainable.
    """
    branch_params = set()
    trainable = added = 0
    for branch in branches:
        layer = branch.experts
        branch_params |= {id(p) for p in layer.parameters()}
        width = layer.dim + layer.dim_out
        query = [p for n, p in layer.named_parameters() if n not in _TABLES]
        added += sum(p.numel() for p in query)
        trainable += sum(p.numel() for p in query if p.requires_grad)
        for _, n_left, n_right, start in layer.segments.tolist():
            rows, keys = n_left * n_right, max(n_left, n_right) * layer.dim_key
            added += rows * width + keys
            if not bool(layer.frozen[start]):  # a segment trains or is frozen whole
                trainable += rows * width + keys
    for delta in low_rank:
        params = list(delta.experts.parameters())
        branch_params |= {id(p) for p in params}
        added += sum(p.numel() for p in params)
        trainable += sum(p.numel() for p in params if p.requires_grad)
    base = [p for p in model.parameters() if id(p) not in branch_params]
    trainable += sum(p.numel() for p in base if p.requires_grad)
    return {"trainable": trainable, "added": added, "total": sum(p.numel() for p in base) + added}
