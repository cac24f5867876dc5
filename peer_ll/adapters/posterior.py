"""Domain inference for Hugging Face causal LMs: the posterior mixture and its loss.

The mixture is :func:`peer_ll.models.insurance.posterior_mixture`, shared with PEERLM.
:func:`domain_outputs`, :func:`infer_forward` and :func:`insured_domain_mixture` run a
model with PEER branches once per route (``owners_scope``) for
:class:`~peer_ll.adapters.ExpertsModel`.

Axis letters: ``O`` domains, ``B`` batch, ``T`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.adapters.branch import owners_scope
from peer_ll.models.insurance import insured_mixture, posterior_mixture


def shifted_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss on log-probabilities: position t predicts labels[t+1].

    Args:
        log_probs: (B, T, V).
        labels: (B, T); -100 entries are ignored.
    """
    return F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100)


def domain_outputs(
    base_model: nn.Module, owners: Sequence[int], input_ids: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, type]:
    """Every owner's logits (O, B, T, V) and the base model's output class.

    Args:
        base_model: a causal LM with PEER branches, called as ``base_model(input_ids=...)``.
        owners: the routes, in order (the base owner first).
        input_ids: (B, T) the tokens; ``kwargs`` go to the model (``labels`` dropped).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be an int tensor (B, T), got {input_ids!r}")
    kwargs.pop("labels", None)
    outs = []
    for owner in owners:
        with owners_scope(owner):
            outs.append(base_model(input_ids=input_ids, **kwargs))
    return torch.stack([o.logits for o in outs]), type(outs[0])


def insured_domain_mixture(
    base_model: nn.Module,
    owners: Sequence[int],
    input_ids: torch.Tensor,
    confidence: float = 0.99,
    *,
    probe: int = 8,
    prior=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`peer_ll.models.insurance.insured_mixture` with :func:`posterior_mixture`:
    log-probabilities (B, T, V) and the routes per token (B,); ``prior``: ``ids (B, T) ->
    (O, B, T)`` causal log-posterior over ``owners`` that runs no route, or None."""

    def route(owner, ids):
        with owners_scope(owner):
            return base_model(input_ids=ids, **kwargs).logits

    return insured_mixture(
        lambda ids: posterior_mixture(domain_outputs(base_model, owners, ids, **kwargs)[0], ids),
        route,
        input_ids,
        owners,
        confidence=confidence,
        probe=probe,
        prior=prior,
    )


def infer_forward(
    base_model: nn.Module,
    owners: Sequence[int],
    *args,
    confidence: float | None = None,
    **kwargs,
):
    """``owners="infer"``: the base model's output class with ``logits`` the posterior
    mixture's log-probabilities (B, T, V) and ``loss`` its causal-LM loss on ``labels``
    (insured with ``confidence``, see :func:`insured_domain_mixture`)."""
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None and args:
        input_ids, args = args[0], args[1:]
    if args:
        raise ValueError(
            f'owners="infer" takes input_ids as the only positional argument, got {len(args)} more'
        )
    labels = kwargs.pop("labels", None)
    if confidence is None:
        logits, kind = domain_outputs(base_model, owners, input_ids, **kwargs)
        log_mix, _ = posterior_mixture(logits, input_ids)
    else:  # every route only on the prefix that decides (the output class from one)
        _, kind = domain_outputs(base_model, owners, input_ids[:1, :1], **kwargs)
        log_mix, _ = insured_domain_mixture(base_model, owners, input_ids, confidence, **kwargs)
    loss = None if labels is None else shifted_nll(log_mix, labels)
    return kind(loss=loss, logits=log_mix)
