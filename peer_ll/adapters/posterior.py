"""Domain inference for causal LMs: a posterior over routes, computed causally.

As in :meth:`peer_ll.models.PEERLM.domain_posterior`: with a uniform prior, the
posterior of domain d at position t is proportional to
``Π_{s<=t} p_d(idx[s] | idx[<s])``, which uses no token after t. Predicting with
the mixture ``Σ_d w_d(t) p_d(· | idx[<=t])`` costs at most ``log O`` nats per
sequence over the best single domain.

Axis letters: ``O`` domains, ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def posterior_mixture(
    logits: torch.Tensor, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the domains' next-token predictions by their causal posterior.

    Args:
        logits: (O, B, T, V) each domain's next-token logits for ``input_ids``.
        input_ids: (B, T) the tokens.

    Returns:
        The mixture's log-probabilities (B, T, V) and the log-posterior (O, B, T).
    """
    if logits.dim() != 4 or tuple(logits.shape[1:3]) != tuple(input_ids.shape):
        raise ValueError(
            f"logits must have shape (O, {', '.join(map(str, input_ids.shape))}, V), "
            f"got {tuple(logits.shape)}"
        )
    logp = logits.float().log_softmax(-1)  # (O, B, T, V)
    with torch.no_grad():
        nxt = input_ids[None, :, 1:, None].expand(logp.shape[0], -1, -1, 1)
        seen = logp[:, :, :-1].gather(-1, nxt).squeeze(-1)  # (O, B, T-1)
        evidence = F.pad(seen.cumsum(-1), (1, 0))  # (O, B, T)
        log_post = evidence.log_softmax(0)
    return torch.logsumexp(logp + log_post[..., None], dim=0), log_post


def shifted_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss on log-probabilities: position t predicts labels[t+1].

    Args:
        log_probs: (B, T, V).
        labels: (B, T); -100 entries are ignored.
    """
    return F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100)
