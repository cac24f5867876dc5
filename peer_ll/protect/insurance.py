"""Retrieval insurance: extra routes only for the inputs whose owner is uncertain.

An :class:`~peer_ll.protect.OwnerRouted` model with a scorer routes each input to its
likeliest owner: one route, one PEER retrieval per layer. Where the scorer is unsure
the argmax owner is often wrong, and a wrong owner means the wrong experts.
:func:`insured_forward` pays for more work on those inputs alone:

- an input whose top owner posterior ``p_max = max_o p(o | x)`` (at ``temperature``)
  reaches ``threshold`` takes its top owner's route, as before (one route);
- an input under the threshold does more work, by ``mode``: "mix" runs the routes of
  its ``top`` likeliest owners and mixes their class probabilities by the renormalised
  posterior (as :func:`peer_ll.experts.mix_owners`): ``top`` routes; "wide" searches every
  owner's experts at once (``owners=None``, the paper's unrestricted retrieval) and
  mixes that with its top owner's route by the top owner's posterior: 2 routes;
  "typical" runs the routes of its ``top`` likeliest owners and keeps the one whose own
  features (the input of ``model.head``) are most typical of that owner's training
  data (:class:`RouteTypicality`): the posterior proposes, the routes decide. Each
  route maps its owner's inputs near its class means; another owner's inputs land off
  them. ``top`` routes.

Off by default: ``OwnerRouted`` is unchanged and nothing here is called unless a user
calls it. The report says what the insurance cost: the share of inputs that paid and
the routes per input (1 for an uninsured forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from peer_ll.experts.checks import check_choice, check_float, check_int, check_owner, check_type
from peer_ll.protect.plugin import experience_loader
from peer_ll.protect.routed import OwnerRouted

__all__ = ["MODES", "FitRouteTypicality", "InsuranceReport", "RouteTypicality", "insured_forward",
           "owner_posterior", "route_features", "routes_by_owner"]  # fmt: skip

#: What an unsure input pays for (see the module docstring).
MODES = ("mix", "wide", "typical")


@torch.no_grad()
def route_features(
    model: nn.Module, x: torch.Tensor, owners, *, layer: str = "head"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) of ``model(x, owners=owners)`` and the input (B, F) of its ``layer``."""
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"layer must name a module of model, got {layer!r}")
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        logits = model(x, owners=owners)
    finally:
        handle.remove()
    return logits, seen[-1].flatten(1)


@torch.no_grad()
def routes_by_owner(
    model: nn.Module, x: torch.Tensor, owners: torch.Tensor, *, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x, owners=owners)`` for (B,) owners, run once per distinct owner.

    A forward with one owner is several times faster than one with per-input owners, so
    each owner's inputs go through together. Returns logits (B, C) and, with ``layer``,
    the input (B, F) of that module (else None).
    """
    out = feats = None
    for o in owners.unique().tolist():
        rows = owners == o
        if layer is None:
            z, f = model(x[rows], owners=o), None
        else:
            z, f = route_features(model, x[rows], o, layer=layer)
        if out is None:
            out = z.new_empty(len(x), *z.shape[1:])
            feats = None if f is None else f.new_empty(len(x), *f.shape[1:])
        out[rows] = z
        if f is not None:
            feats[rows] = f
    return out, feats


class RouteTypicality(nn.Module):
    """How typical a route's features are of its owner's training data.

    Per owner o, fit on o's training inputs through o's own route: class means
    ``mu_{o,c}`` and a shared covariance (shrunk by ``shrink`` towards its mean
    variance) of the features entering ``layer``; the score of features f is
    ``max_c log N(f; mu_{o,c}, Sigma_o)``, standardised by the mean and standard
    deviation of the training inputs' scores, so scores compare across owners (about 0
    for an input like o's own; very negative off o's data). Fit each owner right after
    training it (its route and the trunk are frozen afterwards under routing protection).

    Args:
        layer: name of the module whose input is the feature (default ``"head"``).
        shrink: covariance shrinkage in [0, 1].
    """

    def __init__(self, *, layer: str = "head", shrink: float = 0.1) -> None:
        super().__init__()
        self.layer = layer
        self.shrink = check_float("shrink", shrink, minimum=0.0, maximum=1.0)
        self.owners: list[int] = []

    @torch.no_grad()
    def fit(self, model: nn.Module, owner: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fit ``owner``'s statistics on its inputs x (N, ...) and labels y (N,)."""
        owner = check_owner("owner", owner)
        y = torch.as_tensor(y)
        if len(x) < 2 or y.shape != (len(x),):
            raise ValueError(f"x and y must hold the same N >= 2 inputs, got {len(x)} and "
                             f"{tuple(y.shape)}")  # fmt: skip
        _, f = route_features(model, x, owner, layer=self.layer)
        f = f.double()
        classes, inverse = y.to(f.device).unique(return_inverse=True)
        means = torch.zeros(len(classes), f.shape[1], dtype=f.dtype, device=f.device)
        means.index_add_(0, inverse, f)
        means /= torch.bincount(inverse, minlength=len(classes))[:, None]
        r = f - means[inverse]
        cov = r.T @ r / len(f)
        cov = (1 - self.shrink) * cov + self.shrink * cov.diagonal().mean() * torch.eye(
            len(cov), dtype=f.dtype, device=f.device
        )
        self.register_buffer(f"means_{owner}", means)
        self.register_buffer(f"precision_{owner}", torch.linalg.inv(cov))
        self.register_buffer(f"norm_{owner}", torch.zeros(2, dtype=f.dtype, device=f.device))
        raw = self._raw(owner, f)
        getattr(self, f"norm_{owner}").copy_(torch.stack([raw.mean(), raw.std().clamp_min(1e-12)]))
        if owner not in self.owners:
            self.owners.append(owner)

    def _raw(self, owner: int, f: torch.Tensor) -> torch.Tensor:
        d = f.double()[:, None] - getattr(self, f"means_{owner}")[None]  # (B, K, F)
        m = torch.einsum("bkf,fg,bkg->bk", d, getattr(self, f"precision_{owner}"), d)
        return -0.5 * m.min(1).values  # (B,)

    @torch.no_grad()
    def forward(self, owner: int, features: torch.Tensor) -> torch.Tensor:
        """Standardised typicality (B,) of ``owner``'s route features (B, F)."""
        if owner not in self.owners:
            raise ValueError(f"owner must be one of {self.owners} (fitted), got {owner}")
        mean, std = getattr(self, f"norm_{owner}")
        return ((self._raw(owner, features) - mean) / std).float()


class FitRouteTypicality(SupervisedPlugin):
    """Avalanche plugin: fit ``evidence`` for each experience's owner after training it.

    For ``peer_protect`` strategies (the model an :class:`OwnerRouted`; the owner is
    the experience id). Add it after the strategy's own plugins.

    Args:
        evidence: the :class:`RouteTypicality` to fit.
    """

    def __init__(self, evidence: RouteTypicality) -> None:
        super().__init__()
        self.evidence = check_type("evidence", evidence, RouteTypicality)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        routed = check_type("strategy.model", strategy.model, OwnerRouted)
        xs, ys = zip(*((x, y) for x, y, *_ in experience_loader(strategy)), strict=True)
        modes = {m: m.training for m in routed.modules()}
        try:
            routed.eval()
            owner = int(strategy.experience.current_experience)
            self.evidence.fit(routed.model, owner, torch.cat(xs).to(strategy.device),
                              torch.cat(ys).to(strategy.device))  # fmt: skip
        finally:
            for m, mode in modes.items():
                m.train(mode)


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
    evidence: RouteTypicality | None = None,
) -> tuple[torch.Tensor, InsuranceReport]:
    """Log-probabilities (B, C): one route where the owner is sure, ``top`` where not.

    Args:
        routed: an :class:`OwnerRouted` model with a fitted scorer (in eval mode).
        x: (B, ...) inputs.
        threshold: inputs whose top owner posterior is under it pay for ``top`` routes.
            0 never pays (the plain argmax route); above 1 always pays.
        top: owners mixed for an input that pays (2 or 3 in practice).
        temperature: posterior temperature.
        mode: "mix" (the ``top`` owners' routes), "wide" (every expert, mixed with
            the top owner's route) or "typical" (the most typical of the ``top``
            owners' routes; needs ``evidence``).
        evidence: the fitted :class:`RouteTypicality` of mode "typical".

    Returns:
        ``(log_probs, report)``: (B, C) log class probabilities, and an
        :class:`InsuranceReport`.
    """
    check_float("threshold", threshold, minimum=0.0)
    check_int("top", top, minimum=1)
    check_float("temperature", temperature, minimum=1e-12)
    check_choice("mode", mode, MODES)
    if mode == "typical":
        check_type("evidence", evidence, RouteTypicality)
    ids, post = owner_posterior(routed, x, temperature=temperature)
    top = 2 if mode == "wide" else min(top, ids.numel())
    weights, pick = post.topk(top, dim=1)  # (B, top)
    confidence = weights[:, 0]
    paid = confidence < threshold if top > 1 else torch.zeros_like(confidence, dtype=torch.bool)
    # One forward per owner for all routes: each input's top owner, and the paying
    # inputs' other candidates (mix, typical) with them, so paying adds no forward.
    B, idx = len(x), paid.nonzero().squeeze(1)
    extra = range(1, top) if mode != "wide" and len(idx) else range(0)
    rows = torch.cat([torch.arange(B, device=x.device)] + [idx for _ in extra])
    owners = torch.cat([ids[pick[:, 0]]] + [ids[pick[idx, j]] for j in extra])
    layer = evidence.layer if mode == "typical" else None
    logits, feats = routes_by_owner(routed.model, x[rows], owners, layer=layer)
    logp = logits.float().log_softmax(dim=-1)
    out = logp[:B].clone()
    if len(extra):
        cands = torch.cat([out[idx][None], logp[B:].view(len(extra), len(idx), -1)])
        if mode == "typical":
            score = torch.empty(len(rows), device=x.device)
            for o in owners.unique().tolist():
                score[owners == o] = evidence(o, feats[owners == o]).to(x.device)
            scores = torch.cat([score[idx][None], score[B:].view(len(extra), len(idx))])
            out[idx] = cands[scores.argmax(0), torch.arange(len(idx), device=x.device)]
        else:  # mix: the candidates' class probabilities by the renormalised posterior
            w = weights[idx] / weights[idx].sum(dim=1, keepdim=True)  # (b, top)
            probs = (w.T[..., None] * cands.exp()).sum(0)
            out[idx] = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    elif paid.any() and mode == "wide":
        xs, w = x[paid], confidence[paid, None]
        probs = w * out[paid].exp() + (1 - w) * routed.model(xs, owners=None).float().softmax(-1)
        out[paid] = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    routes = torch.where(paid, top, 1)
    return out, InsuranceReport(paid, confidence, routes)
