"""Retrieval insurance: extra routes only for the inputs whose owner is uncertain.

An :class:`~peer_ll.protect.OwnerRouted` model with a scorer routes each input to its
likeliest owner: one route, one PEER retrieval per layer. Where the scorer is unsure
the argmax owner is often wrong, and a wrong owner means the wrong experts.
:func:`insured_forward` pays for more work on those inputs alone:

- an input whose top owner posterior ``p_max = max_o p(o | x)`` (at ``temperature``)
  reaches ``threshold`` takes its top owner's route, as before (one route);
- an input under the threshold does more work, by ``mode``: "mix" runs the routes of
  its ``top`` likeliest owners and mixes their class probabilities by the renormalised
  posterior (:func:`peer_ll.experts.mix_owners`): ``top`` routes; "wide" searches every
  owner's experts at once (``owners=None``, the paper's unrestricted retrieval) and
  mixes that with its top owner's route by the top owner's posterior: 2 routes.

Off by default: ``OwnerRouted`` is unchanged and nothing here is called unless a user
calls it. The report says what the insurance cost: the share of inputs that paid and
the routes per input (1 for an uninsured forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from peer_ll.experts import OwnerMix, mix_owners
from peer_ll.experts.checks import check_choice, check_float, check_int, check_type
from peer_ll.protect.routed import OwnerRouted

__all__ = ["MODES", "InsuranceReport", "insured_forward", "owner_posterior"]

#: What an unsure input pays for (see the module docstring).
MODES = ("mix", "wide")


class InsuranceReport(NamedTuple):
    """What one insured forward did.

    Attributes:
        paid: (B,) bool, the inputs that ran more than one route.
        confidence: (B,) top owner posterior of each input.
        routes: (B,) routes run per input.
    """

    paid: torch.Tensor
    confidence: torch.Tensor
    routes: torch.Tensor

    @property
    def share(self) -> float:
        """Share of inputs that paid for extra routes."""
        return float(self.paid.float().mean())

    @property
    def routes_per_input(self) -> float:
        """Mean routes per input (1.0: no insurance paid)."""
        return float(self.routes.float().mean())


@torch.no_grad()
def owner_posterior(routed: OwnerRouted, x: torch.Tensor, *, temperature: float = 1.0):
    """Owner ids (O,) and the scorer's posterior (B, O) over them for inputs x (B, ...)."""
    check_type("routed", routed, OwnerRouted)
    if routed.scorer is None or not routed.scorer.owners:
        raise ValueError("routed must have a fitted owner scorer, got none (or no owners)")
    owners, logp = routed.scorer.scores(routed.model, x)
    post = (logp.double() / temperature).softmax(dim=1).float().to(x.device)
    return torch.tensor(owners, device=x.device), post


@torch.no_grad()
def insured_forward(
    routed: OwnerRouted,
    x: torch.Tensor,
    *,
    threshold: float = 0.9,
    top: int = 2,
    temperature: float = 1.0,
    mode: str = "mix",
) -> tuple[torch.Tensor, InsuranceReport]:
    """Log-probabilities (B, C): one route where the owner is sure, ``top`` where not.

    Args:
        routed: an :class:`OwnerRouted` model with a fitted scorer (in eval mode).
        x: (B, ...) inputs.
        threshold: inputs whose top owner posterior is under it pay for ``top`` routes.
            0 never pays (the plain argmax route); above 1 always pays.
        top: owners mixed for an input that pays (2 or 3 in practice).
        temperature: posterior temperature.
        mode: "mix" (the ``top`` owners' routes) or "wide" (every expert, mixed with
            the top owner's route).

    Returns:
        ``(log_probs, report)``: (B, C) log class probabilities, and an
        :class:`InsuranceReport`.
    """
    check_float("threshold", threshold, minimum=0.0)
    check_int("top", top, minimum=1)
    check_float("temperature", temperature, minimum=1e-12)
    check_choice("mode", mode, MODES)
    ids, post = owner_posterior(routed, x, temperature=temperature)
    confidence, best = post.max(dim=1)
    top = 2 if mode == "wide" else min(top, ids.numel())
    paid = confidence < threshold if top > 1 else torch.zeros_like(confidence, dtype=torch.bool)
    out = routed.model(x, owners=ids[best]).float().log_softmax(dim=-1)
    if paid.any() and mode == "wide":
        xs, w = x[paid], confidence[paid, None]
        probs = w * out[paid].exp() + (1 - w) * routed.model(xs, owners=None).float().softmax(-1)
        out[paid] = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    elif paid.any():
        weights, pick = post[paid].topk(top, dim=1)
        weights = weights / weights.sum(dim=1, keepdim=True)
        xs = x[paid]
        mix = OwnerMix(ids[pick], weights)
        probs = mix_owners(lambda o: routed.model(xs, owners=o).float().softmax(dim=-1), mix)
        out[paid] = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    routes = torch.where(paid, top, 1)
    return out, InsuranceReport(paid, confidence, routes)
