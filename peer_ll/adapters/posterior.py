"""Domain inference for Hugging Face causal LMs: the posterior mixture and its loss.

The mixture is :func:`peer_ll.models.insurance.posterior_mixture`, shared with PEERLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peer_ll.models.insurance import posterior_mixture

__all__ = ["posterior_mixture", "shifted_nll"]


def shifted_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss on log-probabilities: position t predicts labels[t+1].

    Args:
        log_probs: (B, T, V).
        labels: (B, T); -100 entries are ignored.
    """
    return F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100)
