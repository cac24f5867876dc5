"""Domain posterior and retrieval insurance for causal LMs with per-domain routes.

:func:`posterior_mixture` mixes the domains' predictions by their causal posterior: with
a uniform prior, the posterior of domain d at position t is proportional to
``Π_{s<=t} p_d(idx[s] | idx[<s])``, which uses no token after t. Predicting with the
mixture ``Σ_d w_d(t) p_d(· | idx[<=t])`` costs at most ``log O`` nats per sequence over
the best single domain. It runs every domain's route for every token. Insurance (not in
the paper, opt-in) runs them only until one domain's posterior is sure, then that
domain's route alone; with a ``prior`` (e.g. :class:`NgramDomainPrior`, byte n-gram
naive Bayes from the prefix, which runs no route) it runs only the routes the prior does
not rule out, each from the sequence's start, mixed by their own causal posterior.
Used by :meth:`peer_ll.models.PEERLM.insured_mixture` and, for Hugging Face models, by
:meth:`peer_ll.adapters.ExpertsModel.insured_mixture`. Axis letters: ``O`` domains,
``B`` batch, ``T``/``W`` positions, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.experts.checks import check_float, check_int

__all__ = ["NgramDomainPrior", "insured_mixture", "posterior_mixture", "prior_mixture"]


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
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mixture only while it is uncertain, then the top domain's route alone.

    With ``prior``, :func:`prior_mixture` instead (``mixture`` and ``probe`` unused).

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
        prior: ``ids (B, T) -> (O, B, T)`` causal log-posterior over the domains that
            runs no route (see :func:`prior_mixture`), or None.

    Returns:
        Log-probabilities (B, T, V), and (B,) routes per token: what a decoder that caches
        each route's keys and values pays, O routes per token up to t_b and one after.
    """
    check_float("confidence", confidence, minimum=0.0, maximum=1.0)
    check_int("probe", probe, minimum=1)
    if prior is not None:
        return prior_mixture(route_logits, idx, owners, prior(idx), confidence=confidence)
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


def prior_mixture(
    route_logits: Callable[[int, torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    owners: Sequence[int],
    log_prior: torch.Tensor,
    *,
    confidence: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run only the routes a cheap causal prior cannot rule out; mix them by posterior.

    At position t the active routes are the domains whose prior probability is at least
    ``1 - confidence``, and always the prior's top domain. Route d of sequence b runs
    from position 0 to its last active position (a decoder must build its cached keys
    and values for the whole prefix), so its evidence ``Π_{s<=t} p_d(idx[s] | idx[<s])``
    is known wherever it is active; position t predicts with the active routes mixed
    by that posterior, renormalised over them. All routes active is
    :func:`posterior_mixture`.

    Args:
        route_logits: ``(owner, ids (b, T)) -> (b, T, V)``, one domain's logits.
        idx: (B, T) token ids.
        owners: the O domains, in ``log_prior``'s order.
        log_prior: (O, B, T) the prior's causal log-posterior (position t uses
            ``idx[:, :t+1]`` only).
        confidence: a domain whose prior probability is under ``1 - confidence`` is
            not run; 0 runs the prior's top domain alone, 1 every domain.

    Returns:
        Log-probabilities (B, T, V), and (B,) routes per token: ``Σ_d (last_d + 1) / T``.
    """
    check_float("confidence", confidence, minimum=0.0, maximum=1.0)
    B, T = idx.shape
    O = len(owners)
    if tuple(log_prior.shape) != (O, B, T):
        raise ValueError(f"log_prior must have shape ({O}, {B}, {T}), got {tuple(log_prior.shape)}")
    prob = log_prior.exp()
    active = (prob >= 1 - confidence) | (prob >= prob.max(0, keepdim=True).values)  # (O, B, T)
    span = torch.arange(1, T + 1, device=idx.device)
    last = (active.long() * span).max(-1).values  # (O, B): positions run; 0 if never
    logp: torch.Tensor | None = None
    for d, owner in enumerate(owners):
        rows = last[d] > 0
        if not bool(rows.any()):
            continue
        out = route_logits(int(owner), idx[rows]).float().log_softmax(-1)  # (b, T, V)
        if logp is None:
            logp = out.new_zeros(O, B, T, out.shape[-1])
        logp[d, rows] = out
    assert logp is not None  # the top domain is always active
    with torch.no_grad():
        nxt = idx[None, :, 1:, None].expand(O, -1, -1, 1)
        seen = logp[:, :, :-1].gather(-1, nxt).squeeze(-1)  # (O, B, T-1)
        evidence = F.pad(seen.cumsum(-1), (1, 0)).masked_fill(~active, float("-inf"))
        weight = evidence.log_softmax(0)  # (O, B, T), -inf where inactive
    mixed = torch.logsumexp(logp + weight[..., None], dim=0)
    return mixed, last.sum(0).float() / T


class NgramDomainPrior(nn.Module):
    """Byte n-gram naive Bayes over domains: a causal domain posterior that runs no route.

    Each domain fitted keeps smoothed n-gram log-probabilities ``log p_d(x_t | x_{t-1})``
    (order 2) or ``log p_d(x_t)`` (order 1) of its training tokens; the posterior at t
    is ``softmax_d Σ_{s<=t} log p_d(x_s | ...)`` with a uniform prior over domains. A
    lookup per token per domain: no model forward. For :func:`prior_mixture`; fit the
    domains in the order of the model's owners.

    Args:
        vocab_size: V, token ids lie in ``[0, V)``.
        order: 1 (unigram) or 2 (bigram).
        alpha: add-alpha smoothing of the counts.
    """

    def __init__(self, vocab_size: int, *, order: int = 2, alpha: float = 0.1) -> None:
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1)
        self.order = check_int("order", order, minimum=1, maximum=2)
        self.alpha = check_float("alpha", alpha, minimum=1e-12)
        shape = (0,) + (vocab_size,) * order
        self.register_buffer("log_probs", torch.zeros(shape))  # (O, [V,] V)

    @property
    def domains(self) -> int:
        """Domains fitted (O)."""
        return self.log_probs.shape[0]

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> int:
        """Add a domain from its training tokens (N, T) or (N,); returns its row."""
        tokens = torch.as_tensor(tokens).long().reshape(len(tokens), -1)
        V = self.vocab_size
        if tokens.numel() == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= V:
            raise ValueError(f"tokens must be non-empty ids in [0, {V}), got shape "
                             f"{tuple(tokens.shape)}")  # fmt: skip
        if self.order == 1:
            counts = torch.bincount(tokens.reshape(-1), minlength=V).double()
        else:
            pairs = tokens[:, :-1] * V + tokens[:, 1:]
            counts = torch.bincount(pairs.reshape(-1), minlength=V * V).double().view(V, V)
        counts = counts + self.alpha
        table = (counts / counts.sum(-1, keepdim=True)).log().float()
        self.log_probs = torch.cat([self.log_probs, table[None].to(self.log_probs)])
        return self.domains - 1

    @torch.no_grad()
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Causal log-posterior (O, B, T) of the domains for ids (B, T)."""
        if self.domains == 0:
            raise ValueError("the prior must have fitted domains (call fit), got none")
        idx = idx.long()
        if self.order == 1:
            ll = self.log_probs[:, idx]  # (O, B, T)
        else:
            step = self.log_probs[:, idx[:, :-1], idx[:, 1:]]  # (O, B, T-1)
            ll = F.pad(step, (1, 0))
        return ll.double().cumsum(-1).log_softmax(0).float()
