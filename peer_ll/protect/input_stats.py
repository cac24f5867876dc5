"""Owner scoring from the model's inputs: per-owner low-rank Gaussians (PPCA).

Query statistics (:mod:`peer_ll.protect.query_stats`) live in the query space of a
network frozen after the first owner: on split streams that space tells later owners
apart poorly. :class:`InputOwnerStats` models each owner's *inputs* instead, so owner
scoring does not depend on what the first owner learned:

- per owner (and, with ``per_class``, per class of that owner: a mixture weighted
  by class counts; with ``components`` > 1, per k-means cluster of each such group)
  a probabilistic PCA Gaussian (Tipping & Bishop 1999): mean μ,
  the top ``rank`` principal directions V with their variances λ, and one
  isotropic variance σ² for the rest, so the covariance is
  ``C = σ² I + Vᵀ diag(λ - σ²) V``; O(owners × classes × rank × D) memory;
- fit once per owner, from that owner's training inputs, in float64; nothing
  else changes it, so no replay is needed;
- :meth:`InputOwnerStats.log_likelihood` scores inputs under every owner, and
  :meth:`InputOwnerStats.scores` gives the owners' posterior log-probabilities (the
  owner-scorer interface of :class:`~peer_ll.protect.routed.OwnerRouted`).

This is a departure from the PEER paper (which has no owners): an owner-scoring option
(``peer_protect(inference="input")``), compared in ``benchmarks/RESULTS.md``. Inputs
are flattened per sample, so it suits models whose PEER layers see one vector per
sample (classifiers), not sequence models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts.checks import check_int, check_owner
from peer_ll.protect.finite import finite_rows


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
            raise ValueError(f"min_var must be a float > 0, got {min_var!r}")
        self.min_var = float(min_var)
        self.dim: int | None = None
        # owner -> list of (log weight, mean (D,), V (r, D), lam (r,), s2 ()) float64
        self.groups: dict[
            int, list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
        ] = {}

    @property
    def owners(self) -> list[int]:
        """Owners with statistics, ascending."""
        return sorted(self.groups)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, per_class={self.per_class}, components={self.components}, "
            f"owners={self.owners}"
        )

    # ---------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(
        self,
        model: nn.Module | None,
        owner: int,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        replay=None,
    ) -> None:
        """Set ``owner``'s statistics from its inputs x (N, ...) (and labels (N,)).

        Replaces what ``owner`` had; other owners are untouched. Nothing changes if
        an argument is bad. Samples holding NaN or inf are skipped, counted in
        ``nonfinite_skipped`` and warned about once. ``model`` and ``replay`` are
        unused (the scorer interface passes them).
        """
        owner = check_owner("owner", owner)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or len(x) < 1:
            raise ValueError(f"x must be a tensor (N, ...) with N >= 1, got {_shape(x)}")
        flat = x.reshape(len(x), -1).double()
        keep = finite_rows(self, flat, owner)  # non-finite samples are skipped and counted
        if not bool(keep.any()):
            raise ValueError(f"x must hold at least one finite sample, got {len(x)} non-finite")
        if self.dim is not None and flat.shape[1] != self.dim:
            raise ValueError(
                f"x must have {self.dim} values per sample (as fitted before), got {flat.shape[1]}"
            )
        flat = flat[keep]
        if labels is None or not self.per_class:
            parts = [flat]
        else:
            if not isinstance(labels, torch.Tensor) or labels.shape != (len(x),):
                raise ValueError(
                    f"labels must be a tensor of shape ({len(x)},), got {_shape(labels)}"
                )
            labels = labels.to(flat.device)[keep]
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
            raise ValueError(f"owners must include owners with statistics {known}, got {owners}")
        flat = x.reshape(len(x), -1).double()
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} values per sample, got {flat.shape[1]}")
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

    def scores(self, model: nn.Module | None, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, log-probabilities (N, O)): the owners' posterior for inputs x (N, ...).

        ``model`` is unused (the scorer interface passes it).
        """
        owners, ll = self.log_likelihood(x)
        return owners, ll.log_softmax(dim=1).to(x.device)

    # --------------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        return {
            "rank": self.rank,
            "per_class": self.per_class,
            "min_var": self.min_var,
            "components": self.components,
            "dim": self.dim,
            "groups": {
                o: [(w, m.cpu(), V.cpu(), lam.cpu(), s2.cpu()) for w, m, V, lam, s2 in g]
                for o, g in self.groups.items()
            },
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "groups" not in state:
            raise ValueError(
                f"state must be InputOwnerStats extra state (a dict with 'groups'), "
                f"got {type(state).__name__}"
            )
        self.rank, self.per_class = int(state["rank"]), bool(state["per_class"])
        self.components = int(state.get("components", 1))
        self.min_var, self.dim = float(state["min_var"]), state["dim"]
        self.groups = {int(o): [tuple(t) for t in g] for o, g in state["groups"].items()}


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
        moved = torch.stack(
            [
                X[assign == j].mean(0) if bool((assign == j).any()) else centres[j]
                for j in range(len(centres))
            ]
        )
        if torch.equal(moved, centres):
            break
        centres = moved
    assign = torch.cdist(X, centres).argmin(dim=1)
    return [X[assign == j] for j in range(len(centres)) if bool((assign == j).any())]


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = ["InputOwnerStats"]
