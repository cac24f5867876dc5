"""Owner inference from the model's inputs: per-owner low-rank Gaussians (PPCA).

The query statistics of :mod:`peer_ll.experts.owner_stats` live in the query space
of a network frozen after the first owner: on split streams that space tells
later owners apart poorly. :class:`InputOwnerStats` models each owner's *inputs*
instead, so owner inference does not depend on what the first owner learned:

- per owner (and, with ``per_class``, per class of that owner: a mixture weighted
  by class counts; with ``components`` > 1, per k-means cluster of each such group)
  a probabilistic PCA Gaussian (Tipping & Bishop 1999): mean μ,
  the top ``rank`` principal directions V with their variances λ, and one
  isotropic variance σ² for the rest, so the covariance is
  ``C = σ² I + Vᵀ diag(λ - σ²) V``; O(owners × classes × rank × D) memory;
- fit once per owner, from that owner's training inputs, in float64; nothing
  else changes it, so no replay is needed;
- :meth:`InputOwnerStats.log_likelihood` scores inputs under every owner, and
  :meth:`InputOwnerStats.attach` makes every eval-mode forward of a model restrict
  each sample's retrieval (and its :class:`~peer_ll.models.owner_head.OwnerHead`)
  to its most likely owner, or, with ``soft=True``, run the model once per each
  sample's ``top`` most likely owners and mix the class probabilities by the
  posterior ``softmax(log p(x | owner) / temperature)`` renormalised over them
  (the model then returns log-probabilities ``log Σ_m w_m softmax(z_m)``, whose
  argmax and cross-entropy are those of the mixture).

This is a departure from the PEER paper (which has no owners) and from the
issue's query-space statistics: it is an extra owner-inference option
(``peer_protect(inference="input")``), compared in ``benchmarks/RESULTS.md``.
Inputs are flattened per sample, so it suits models whose PEER layers see one
vector per sample (classifiers), not sequence models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts.checks import check_int, check_owner
from peer_ll.experts.peer import PEER


class InputOwnerStats(nn.Module):
    """Per-owner PPCA statistics of flattened inputs, in the state_dict (extra state).

    Args:
        rank: principal directions kept per Gaussian (fewer if a group has fewer
            samples).
        per_class: one Gaussian per (owner, class) mixed by class frequency, instead
            of one per owner.
        components: Gaussians per group (owner, or owner and class): its inputs are
            split by k-means (k-means++ seeding from a fixed seed, Lloyd steps) and
            each cluster gets its own PPCA, mixed by cluster size.
        min_var: floor of every variance (σ² and λ), in input units squared.

    Shapes:
        x (N, ...) inputs, flattened to (N, D); labels (N,) ints.
    """

    def __init__(
        self, rank: int = 20, *, per_class: bool = True, components: int = 1,
        min_var: float = 1e-4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.rank = check_int("rank", rank, minimum=0)
        self.per_class = bool(per_class)
        self.components = check_int("components", components, minimum=1)
        if not (isinstance(min_var, int | float) and min_var > 0):
            raise ValueError(f"min_var: expected a float > 0, got {min_var!r}")
        self.min_var = float(min_var)
        self.dim: int | None = None
        # owner -> list of (log weight, mean (D,), V (r, D), lam (r,), s2 ()) float64
        self.groups: dict[int, list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]]] = {}

    @property
    def owners(self) -> list[int]:
        """Owners with statistics, ascending."""
        return sorted(self.groups)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, per_class={self.per_class}, components={self.components}, "
                f"owners={self.owners}")

    # ---------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, owner: int, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Set ``owner``'s statistics from its inputs x (N, ...) (and labels (N,)).

        Replaces what ``owner`` had; other owners are untouched. Nothing changes if
        an argument is bad.
        """
        owner = check_owner("owner", owner)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) < 1:
            raise ValueError(f"x: expected a tensor (N, ...) with N >= 1, got {_shape(x)}")
        flat = x.reshape(len(x), -1).double()
        if self.dim is not None and flat.shape[1] != self.dim:
            raise ValueError(
                f"x: expected {self.dim} values per sample (as fitted before), got "
                f"{flat.shape[1]}"
            )
        if labels is None or not self.per_class:
            parts = [flat]
        else:
            if not isinstance(labels, torch.Tensor) or labels.shape != (len(x),):
                raise ValueError(
                    f"labels: expected a tensor of shape ({len(x)},), got {_shape(labels)}"
                )
            labels = labels.to(flat.device)
            parts = [flat[labels == c] for c in labels.unique()]
        if self.components > 1:
            parts = [c for p in parts for c in _kmeans(p, self.components)]
        groups = [(math.log(len(p) / len(flat)), *self._ppca(p)) for p in parts]
        self.dim = flat.shape[1]
        self.groups[owner] = groups

    def _ppca(self, X: torch.Tensor):
        """Mean (D,), directions (r, D), variances (r,), isotropic variance () of X (n, D)."""
        n, D = X.shape
        mean = X.mean(0)
        Xc = X - mean
        r = min(self.rank, n - 1, D - 1) if n > 1 else 0
        total = (Xc**2).sum() / n  # trace of the ML covariance
        if r > 0:
            _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
            lam, V = S[:r] ** 2 / n, Vh[:r]
        else:
            lam, V = X.new_zeros(0), X.new_zeros(0, D)
        s2 = ((total - lam.sum()) / (D - r)).clamp_min(self.min_var)
        return mean, V, lam.clamp_min(s2), s2

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, owners: Iterable[int] | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """log p(x | owner) for every sample and owner: (owners O, (N, O) float64)."""
        known = self.owners
        owners = known if owners is None else [o for o in owners if o in self.groups]
        if not owners:
            raise ValueError(f"owners: expected owners with statistics {known}, got none of them")
        flat = x.reshape(len(x), -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} values per sample, got {flat.shape[1]}")
        D = self.dim
        cols = []
        for o in owners:
            terms = []
            for logw, mean, V, lam, s2 in self.groups[o]:
                xc = flat - mean.to(flat.device)
                proj = xc @ V.to(flat.device).T  # (N, r)
                quad = (xc**2).sum(1) / s2 - (proj**2 * (1 / s2 - 1 / lam)).sum(1)
                logdet = lam.log().sum() + (D - len(lam)) * s2.log()
                terms.append(logw - 0.5 * (quad + logdet + D * math.log(2 * math.pi)))
            cols.append(torch.logsumexp(torch.stack(terms), dim=0))
        return owners, torch.stack(cols, dim=1)

    def infer(self, x: torch.Tensor, owners: Iterable[int] | None = None) -> torch.Tensor:
        """The most likely owner of each sample: (N,) int64."""
        candidates, ll = self.log_likelihood(x, owners)
        return torch.tensor(candidates, device=x.device)[ll.argmax(1).to(x.device)]

    # ------------------------------------------------------------------ routing
    def attach(
        self,
        model: nn.Module,
        owners: Iterable[int] | None = None,
        *,
        soft: bool = False,
        top: int = 2,
        temperature: float = 1.0,
    ) -> InputRouting:
        """Route every eval-mode forward of ``model`` to each sample's inferred owner.

        Args:
            model: a model with PEER layers whose forward takes the inputs (N, ...)
                first; with ``soft`` it must return logits (N, C).
            owners: candidate owners (default: every owner with statistics).
            soft: mix the ``top`` most likely owners' class probabilities by posterior.
            top: owners mixed per sample when ``soft`` (at most the candidates).
            temperature: posterior ``softmax(log-likelihood / temperature)``.

        Returns a handle; ``handle.remove()`` restores the layers' ``eval_owners``.
        ``handle.last_owners`` holds the top owners (N,) of the latest forward.
        """
        options = self.routing_options(soft=soft, top=top, temperature=temperature)
        return InputRouting(self, model, owners, **options)

    @staticmethod
    def routing_options(*, soft: bool = False, top: int = 2, temperature: float = 1.0) -> dict:
        """Checked :meth:`attach` options ``soft``, ``top``, ``temperature`` as a dict."""
        top = check_int("top", top, minimum=1)
        if not (isinstance(temperature, int | float) and not isinstance(temperature, bool)
                and temperature > 0):
            raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
        return dict(soft=bool(soft), top=top, temperature=float(temperature))

    # --------------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        return {
            "rank": self.rank, "per_class": self.per_class, "min_var": self.min_var,
            "components": self.components, "dim": self.dim,
            "groups": {
                o: [(w, m.cpu(), V.cpu(), lam.cpu(), s2.cpu()) for w, m, V, lam, s2 in g]
                for o, g in self.groups.items()
            },
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "groups" not in state:
            raise ValueError("state: expected InputOwnerStats extra state (a dict with 'groups')")
        self.rank, self.per_class = int(state["rank"]), bool(state["per_class"])
        self.components = int(state.get("components", 1))
        self.min_var, self.dim = float(state["min_var"]), state["dim"]
        self.groups = {int(o): [tuple(t) for t in g] for o, g in state["groups"].items()}


class InputRouting:
    """Forward hooks that set every PEER layer's ``eval_owners`` per sample (and mix).

    The pre-hook restricts each sample to its most likely owner. With ``soft`` a
    forward hook then re-runs ``model.forward`` (hooks bypassed) for each sample's
    next most likely owners and returns ``log Σ_m w_m softmax(z_m)`` (N, C), with
    ``w`` (N, M) the posterior over those M owners.
    """

    def __init__(self, stats: InputOwnerStats, model: nn.Module, owners, *, soft: bool = False,
                 top: int = 2, temperature: float = 1.0) -> None:
        self.stats, self.model = stats, model
        self.owners = None if owners is None else list(owners)
        self.soft, self.top, self.temperature = soft, top, temperature
        self.layers = [m for m in model.modules() if isinstance(m, PEER)]
        if not self.layers:
            raise ValueError("model: expected a model with PEER layers, got none")
        self.saved = [layer.eval_owners for layer in self.layers]
        self.last_owners: torch.Tensor | None = None
        self._ranked: tuple[torch.Tensor, torch.Tensor] | None = None  # owners, weights (N, M)
        self.handle = model.register_forward_pre_hook(self._hook)
        self.mix_handle = model.register_forward_hook(self._mix) if soft else None

    def _set(self, owners: torch.Tensor) -> None:
        for layer in self.layers:
            layer.eval_owners = owners

    def _hook(self, module, args):
        self._ranked = None
        if module.training or not args:
            return None
        candidates, ll = self.stats.log_likelihood(args[0], self.owners)
        best, order = ll.topk(min(self.top if self.soft else 1, ll.shape[1]), dim=1)
        ranked = torch.tensor(candidates, device=args[0].device)[order.to(args[0].device)]
        if self.soft:
            weights = (best / self.temperature).softmax(dim=1)
            self._ranked = ranked, weights.to(args[0].device)
        self._set(ranked[:, 0])
        self.last_owners = ranked[:, 0]
        return None

    def _mix(self, module, args, output):
        if self._ranked is None:
            return None
        ranked, weights = self._ranked
        self._ranked = None
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or len(output) != len(ranked):
            raise TypeError(
                f"model: soft owner mixing expects logits (N, C) with N = {len(ranked)}, got "
                f"{_shape(output)}"
            )
        logp = [output.log_softmax(-1)]
        try:
            for m in range(1, ranked.shape[1]):
                self._set(ranked[:, m])
                logp.append(module.forward(*args).log_softmax(-1))
        finally:
            self._set(ranked[:, 0])
        mixed = torch.stack(logp, dim=-1) + weights.log().to(output.dtype).unsqueeze(1)
        return mixed.logsumexp(dim=-1)

    def remove(self) -> None:
        self.handle.remove()
        if self.mix_handle is not None:
            self.mix_handle.remove()
        for layer, saved in zip(self.layers, self.saved, strict=True):
            layer.eval_owners = saved


@torch.no_grad()
def _kmeans(X: torch.Tensor, k: int, steps: int = 25, seed: int = 0) -> list[torch.Tensor]:
    """Split rows X (n, D) into at most k non-empty clusters (k-means++, Lloyd steps)."""
    k = min(k, len(X))
    if k <= 1:
        return [X]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = [X[int(torch.randint(len(X), (1,), generator=gen))]]
    for _ in range(k - 1):  # k-means++: far points are likelier centres
        d2 = torch.cdist(X, torch.stack(centres)).min(dim=1).values.square().cpu()
        if float(d2.sum()) == 0.0:
            break
        centres.append(X[int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))])
    centres = torch.stack(centres)
    for _ in range(steps):
        assign = torch.cdist(X, centres).argmin(dim=1)
        moved = torch.stack([X[assign == j].mean(0) if bool((assign == j).any()) else centres[j]
                             for j in range(len(centres))])
        if torch.equal(moved, centres):
            break
        centres = moved
    assign = torch.cdist(X, centres).argmin(dim=1)
    return [X[assign == j] for j in range(len(centres)) if bool((assign == j).any())]


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = ["InputOwnerStats", "InputRouting"]
