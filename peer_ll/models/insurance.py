"""Retrieval insurance for causal LMs with per-domain routes (not in the paper, opt-in).

The posterior mixture over domains runs every domain's route for every token. Insurance
runs them only until one domain's posterior is sure, then that domain's route alone.
Used by :meth:`peer_ll.models.PEERLM.insured_mixture` and, for Hugging Face models, by
:meth:`peer_ll.adapters.ExpertsModel.insured_mixture`. Axis letters: ``O`` domains,
``B`` batch, ``T``/``W`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from peer_ll.experts.checks import check_float, check_int


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
