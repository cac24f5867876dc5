"""Owner inference from the model's inputs: per-owner low-rank Gaussians (PPCA).

The query statistics of :mod:`peer_ll.experts.owner_stats` live in the query space
of a network frozen after the first owner: on split streams that space tells
later owners apart poorly. :class:`InputOwnerStats` models each owner's *inputs*
instead, so owner inference does not depend on what the first owner learned:

- per owner (and, with ``per_class``, per class of that owner: a mixture weighted
  by class counts) a probabilistic PCA Gaussian (Tipping & Bishop 1999): mean μ,
  the top ``rank`` principal directions V with their variances λ, and one
  isotropic variance σ² for the rest, so the covariance is
  ``C = σ² I + Vᵀ diag(λ - σ²) V``; O(owners × classes × rank × D) memory;
- fit once per owner, from that owner's training inputs, in float64; nothing
  else changes it, so no replay is needed;
- :meth:`InputOwnerStats.log_likelihood` scores inputs under every owner, and
  :meth:`InputOwnerStats.attach` makes every eval-mode forward of a model restrict
  each sample's retrieval (and its :class:`~peer_ll.models.owner_head.OwnerHead`)
  to its most likely owner.

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
        min_var: floor of every variance (σ² and λ), in input units squared.

    Shapes:
        x (N, ...) inputs, flattened to (N, D); labels (N,) ints.
    """

    def __init__(self, rank: int = 20, *, per_class: bool = True, min_var: float = 1e-4) -> None:
        super().__init__()
        self.rank = check_int("rank", rank, minimum=0)
        self.per_class = bool(per_class)
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
        return f"rank={self.rank}, per_class={self.per_class}, owners={self.owners}"

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
    def attach(self, model: nn.Module, owners: Iterable[int] | None = None) -> InputRouting:
        """Route every eval-mode forward of ``model`` to each sample's inferred owner.

        Returns a handle; ``handle.remove()`` restores the layers' ``eval_owners``.
        ``handle.last_owners`` holds the owners (N,) of the latest forward.
        """
        return InputRouting(self, model, owners)

    # --------------------------------------------------------------- state_dict
    def get_extra_state(self) -> dict:
        return {
            "rank": self.rank, "per_class": self.per_class, "min_var": self.min_var,
            "dim": self.dim,
            "groups": {
                o: [(w, m.cpu(), V.cpu(), lam.cpu(), s2.cpu()) for w, m, V, lam, s2 in g]
                for o, g in self.groups.items()
            },
        }

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "groups" not in state:
            raise ValueError("state: expected InputOwnerStats extra state (a dict with 'groups')")
        self.rank, self.per_class = int(state["rank"]), bool(state["per_class"])
        self.min_var, self.dim = float(state["min_var"]), state["dim"]
        self.groups = {int(o): [tuple(t) for t in g] for o, g in state["groups"].items()}


class InputRouting:
    """Forward pre-hook that sets every PEER layer's ``eval_owners`` per sample."""

    def __init__(self, stats: InputOwnerStats, model: nn.Module, owners) -> None:
        self.stats, self.model = stats, model
        self.owners = None if owners is None else list(owners)
        self.layers = [m for m in model.modules() if isinstance(m, PEER)]
        if not self.layers:
            raise ValueError("model: expected a model with PEER layers, got none")
        self.saved = [layer.eval_owners for layer in self.layers]
        self.last_owners: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.training or not args:
            return None
        owners = self.stats.infer(args[0], self.owners)
        for layer in self.layers:
            layer.eval_owners = owners
        self.last_owners = owners
        return None

    def remove(self) -> None:
        self.handle.remove()
        for layer, saved in zip(self.layers, self.saved, strict=True):
            layer.eval_owners = saved


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


__all__ = ["InputOwnerStats", "InputRouting"]
