"""Domain posterior and retrieval insurance for causal LMs with per-domain routes.

:func:`posterior_mixture` mixes the domains' predictions by their causal posterior: with
a uniform prior, the posterior of domain d at position t is proportional to
``Π_{s<=t} p_d(idx[s] | idx[<s])``, which uses no token after t. Predicting with the
mixture ``Σ_d w_d(t) p_d(· | idx[<=t])`` costs at most ``log O`` nats per sequence over
the best single domain. It runs every domain's route for every token. Insurance (not in
the paper, opt-in) runs them only until one domain's posterior is sure, then that
domain's route alone.
Used by :meth:`peer_ll.models.PEERLM.insured_mixture` and, for Hugging Face models, by
:meth:`peer_ll.adapters.ExpertsModel.insured_mixture`. Axis letters: ``O`` domains,
``B`` batch, ``T``/``W`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from peer_ll.experts.checks import check_float, check_int


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


def insured_mixture(
    mixture: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    route_logits: Callable[[int, torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    owners: Sequence[int],
    *,
    confidence: float,
    probe: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mixture only while it is uncertain, then the top domain's route alone.

    Sequence b runs every domain's route up to the first position t_b where one domain's
    posterior reaches ``confidence``; positions up to t_b predict with the mixture, later
    ones with that domain's route only. A sequence that never gets there keeps the full
    mixture. The prefix is searched ``probe`` tokens at a time, doubling.

    Args:
        mixture: ``ids (B, W) -> (log-probabilities (B, W, V), log-posterior (O, B, W))``,
            the posterior mixture on a prefix.
        route_logits: ``(owner, ids (b, T)) -> (b, T, V)``, one domain's logits.
        idx: (B, T) token ids.
        owners: the O domains, in the log-posterior's order.
        confidence: posterior probability at which a sequence commits to a domain.
        probe: first prefix length searched.

    Returns:
        Log-probabilities (B, T, V), and (B,) routes per token: what a decoder that caches
        each route's keys and values pays, O routes per token up to t_b and one after.
    """
    check_float("confidence", confidence, minimum=0.0, maximum=1.0)
    check_int("probe", probe, minimum=1)
    B, T = idx.shape
    O = len(owners)
    commit = torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    owner = torch.full((B,), -1, dtype=torch.long, device=idx.device)
    width = min(probe, T)
    while True:
        mix, log_post = mixture(idx[:, :width])  # (B, W, V), (O, B, W)
        top, best = log_post.exp().max(0)  # (B, W)
        sure = top >= confidence
        first = torch.where(sure.any(1), sure.float().argmax(1), width)  # (B,)
        done = first < width
        if bool(done.all()) or width == T:
            break
        width = min(2 * width, T)
    ids = torch.tensor(list(owners), device=idx.device)
    commit[done] = first[done]
    owner[done] = ids[best[done, first[done]]]
    out = torch.empty(B, T, mix.shape[-1], device=mix.device, dtype=mix.dtype)
    out[:, :width] = mix
    for d in owner[done & (commit < T - 1)].unique().tolist():
        rows = (owner == d) & (commit < T - 1)
        routed = route_logits(d, idx[rows]).float().log_softmax(-1)
        later = torch.arange(T, device=idx.device)[None] > commit[rows, None]  # (b, T)
        out[rows] = torch.where(later[..., None], routed, out[rows])
    routes = (O * (commit + 1) + (T - 1 - commit)).float() / T
    return out, routes
