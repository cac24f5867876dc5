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


def insured_mixture(
    domain_logits,
    route_logits,
    input_ids: torch.Tensor,
    owners: list[int],
    *,
    confidence: float,
    probe: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mixture only while it is uncertain, then the top domain's route alone.

    As :meth:`peer_ll.models.PEERLM.insured_mixture`: sequence b runs every domain's route
    up to the first position t_b where one domain's posterior reaches ``confidence``;
    positions up to t_b predict with the mixture, later ones with that domain's route
    only. A sequence that never gets there keeps the full mixture. The prefix is searched
    ``probe`` tokens at a time, doubling.

    Args:
        domain_logits: ``ids (B, W) -> (O, B, W, V)``, every domain's logits on a prefix.
        route_logits: ``(owner, ids (b, T)) -> (b, T, V)``, one domain's logits.
        input_ids: (B, T) tokens.
        owners: the O domains, in ``domain_logits`` order.
        confidence: posterior probability at which a sequence commits to a domain.
        probe: first prefix length searched.

    Returns:
        Log-probabilities (B, T, V), and (B,) routes per token: what a decoder that caches
        each route's keys and values pays (O per token up to t_b, one after).
    """
    from peer_ll.experts.checks import check_float, check_int

    check_float("confidence", confidence, minimum=0.0, maximum=1.0)
    check_int("probe", probe, minimum=1)
    B, T = input_ids.shape
    width = min(probe, T)
    while True:
        mix, log_post = posterior_mixture(domain_logits(input_ids[:, :width]), input_ids[:, :width])
        top, best = log_post.exp().max(0)  # (B, W)
        sure = top >= confidence
        first = torch.where(sure.any(1), sure.float().argmax(1), width)  # (B,)
        done = first < width
        if bool(done.all()) or width == T:
            break
        width = min(2 * width, T)
    ids = torch.tensor(owners, device=input_ids.device)
    commit = torch.where(done, first, torch.full_like(first, T - 1))
    owner = torch.where(done, ids[best.gather(1, first.clamp(max=width - 1)[:, None])[:, 0]], -1)
    out = mix.new_empty(B, T, mix.shape[-1])
    out[:, :width] = mix
    for d in owner[done & (commit < T - 1)].unique().tolist():
        rows = (owner == d) & (commit < T - 1)
        routed = route_logits(d, input_ids[rows]).float().log_softmax(-1)
        later = torch.arange(T, device=input_ids.device)[None] > commit[rows, None]  # (b, T)
        out[rows] = torch.where(later[..., None], routed, out[rows])
    routes = (len(owners) * (commit + 1) + (T - 1 - commit)).float() / T
    return out, routes
