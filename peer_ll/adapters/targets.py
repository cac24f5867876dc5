"""What add_experts needs to know about the modules it wraps."""

from __future__ import annotations

from torch import nn


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes activations in backward."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def projection_widths(block: nn.Module, name: str) -> tuple[int, int]:
    """(input, output) widths of a feed-forward block: its first and last projections."""
    projections = []
    for m in block.modules():
        if isinstance(m, nn.Linear):
            projections.append((m.in_features, m.out_features))
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
            projections.append(tuple(m.weight.shape))  # transformers' Conv1D: (in, out)
    if not projections:
        raise ValueError(f"target_modules must name blocks with Linear layers, got {name!r}")
    return projections[0][0], projections[-1][1]
