"""Owner scoring by query likelihood: per-owner Gaussians of a PEER layer's queries.

Each owner (task or experience id) gets a count, a mean (H, d) and a second moment per
head of the queries ``norm(W_q x)`` that its training inputs produce in one PEER layer
(by default the model's first): a diagonal (H, d) sum of squared deviations, or with
``covariance="full"`` an (H, d, d) co-moment matrix. Batches merge exactly (Chan et al.'s
pairwise update of Welford's algorithm) in float64. The statistics describe the shared
query (before any per-owner query adapter), so they compare across owners.

:class:`QueryOwnerStats` is an owner scorer (see :mod:`peer_ll.protect.routed`):
``fit(model, owner, x)`` collects an owner's statistics after its experience, in eval
mode; ``scores(model, x)`` gives the posterior log-probabilities of the owners from the
Gaussian log-likelihoods summed over heads. Only the protection method pays for this: a
plain PEER layer keeps no statistics. Axis letters: ``T`` queries, ``O`` owners, ``H``
heads, ``d`` dim_key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peer_ll.experts.checks import check_choice, check_float, check_int, check_owner
from peer_ll.protect.finite import finite_rows
from peer_ll.protect.routed import CHUNK, layer_input, pick_layer

COVARIANCES = ("diag", "full")
_STATS = ("mean", "m2")


class QueryOwnerStats(nn.Module):
    """Running query statistics per owner (float64 buffers, in the state_dict); a scorer.

    Args:
        heads: number of heads H of the scored layer.
        dim_key: its query size d.
        covariance: "diag" (per-dimension variance) or "full" (per-head covariance).
        min_var: added to every variance when scoring.
        layer: name of the PEER layer whose queries are modelled (None: the first).

    Buffers:
        ``owner_ids`` (O,) int64, ``count`` (O,) int64, ``mean`` (O, H, d) float64,
        ``m2`` (O, H, d) or (O, H, d, d) float64: sums of squared deviations.
    """

    def __init__(
        self,
        heads: int,
        dim_key: int,
        *,
        covariance: str = "diag",
        min_var: float = 1e-4,
        layer: str | None = None,
    ) -> None:
        super().__init__()
        self.heads = check_int("heads", heads, minimum=1)
        self.dim_key = check_int("dim_key", dim_key, minimum=1)
        self.covariance = check_choice("covariance", covariance, COVARIANCES)
        self.min_var = check_float("min_var", min_var, minimum=0.0)
        self.layer = layer
        moment = (heads, dim_key) if covariance == "diag" else (heads, dim_key, dim_key)
        self.register_buffer("owner_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("count", torch.zeros(0, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(0, heads, dim_key, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(0, *moment, dtype=torch.float64))

    @classmethod
    def for_model(cls, model: nn.Module, *, layer: str | None = None, **options):
        """Statistics shaped for ``model``'s PEER layer ``layer`` (None: the first)."""
        peer = pick_layer(model, layer)
        return cls(peer.heads, peer.dim_key, layer=layer, **options)

    # ------------------------------------------------------------------ access
    @property
    def owners(self) -> list[int]:
        """Owners that have statistics (possibly with a count of 0 after a reset)."""
        return self.owner_ids.tolist()

    def row(self, owner: int) -> int:
        """Row of ``owner`` in the buffers; raises ValueError if it has none."""
        owner = check_owner("owner", owner)
        hits = (self.owner_ids == owner).nonzero().flatten()
        if not len(hits):
            raise ValueError(
                f"owner must be one of {self.owners} (owners with statistics), got {owner}"
            )
        return int(hits[0])

    def count_of(self, owner: int) -> int:
        """Number of queries recorded for ``owner`` (0 if none)."""
        owner = check_owner("owner", owner)
        return int(self.count[self.row(owner)]) if owner in self.owners else 0

    def covariance_of(self, owner: int, *, unbiased: bool = True) -> torch.Tensor:
        """(H, d, d) float64 covariance of ``owner``'s queries (diagonal if "diag")."""
        r = self.row(owner)
        n = int(self.count[r]) - int(unbiased)
        if n <= 0:
            raise ValueError(
                f"owner {owner} must have more than {int(unbiased)} queries, "
                f"got {int(self.count[r])}"
            )
        return torch.diag_embed(self.m2[r] / n) if self.covariance == "diag" else self.m2[r] / n

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def fit(self, model: nn.Module, owner: int, x: torch.Tensor, y=None, replay=None) -> None:
        """Collect ``owner``'s statistics afresh from its inputs x (N, ...), model in eval.

        ``y`` and ``replay`` are unused (the scorer interface passes them).
        """
        layer = pick_layer(model, self.layer)
        owner = check_owner("owner", owner)
        if owner in self.owners:
            self.reset(owner)
        for part in x.split(CHUNK):
            self.update(owner, layer.query(layer_input(model, layer, part)))

    @torch.no_grad()
    def scores(self, model: nn.Module, x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(owners O, log-probabilities (B, O)) of each input's owner, by query likelihood."""
        owners = self.usable_owners()
        if not owners:
            raise ValueError("owners with statistics must exist (fit the scorer first), got none")
        layer = pick_layer(model, self.layer)
        q = layer.query(layer_input(model, layer, x)).reshape(len(x), -1, self.heads, self.dim_key)
        if q.shape[1] != 1:
            raise ValueError(
                f"x must give one query per input at the scored layer, got {q.shape[1]} per input"
            )
        ll = self.log_likelihood(q[:, 0], owners, min_var=self.min_var)
        return owners, ll.log_softmax(dim=1).to(x.device)

    # ------------------------------------------------------------------ update
    def _add_owner(self, owner: int) -> int:
        self.owner_ids = torch.cat([self.owner_ids, self.owner_ids.new_tensor([owner])])
        self.count = torch.cat([self.count, self.count.new_zeros(1)])
        self.mean = torch.cat([self.mean, self.mean.new_zeros(1, *self.mean.shape[1:])])
        self.m2 = torch.cat([self.m2, self.m2.new_zeros(1, *self.m2.shape[1:])])
        return len(self.owner_ids) - 1

    @torch.no_grad()
    def update(self, owner: int, queries: torch.Tensor) -> None:
        """Merge a batch of ``owner``'s queries (..., H, d) into its statistics (exact).

        Queries holding NaN or inf are skipped, counted in ``nonfinite_skipped`` and
        warned about once (see :mod:`peer_ll.protect.finite`).
        """
        owner = check_owner("owner", owner)
        if queries.shape[-2:] != (self.heads, self.dim_key):
            raise ValueError(
                f"queries must have shape (..., {self.heads}, {self.dim_key}), "
                f"got {tuple(queries.shape)}"
            )
        q = queries.detach().reshape(-1, self.heads, self.dim_key).to(self.mean)
        q = q[finite_rows(self, q, owner)]  # non-finite queries are skipped and counted
        n_b = q.shape[0]
        if n_b == 0:
            return
        r = self.row(owner) if owner in self.owners else self._add_owner(owner)
        mean_b = q.mean(dim=0)  # (H, d)
        centred = q - mean_b
        if self.covariance == "diag":
            m2_b = centred.square().sum(dim=0)
        else:
            m2_b = torch.einsum("thi,thj->hij", centred, centred)
        n_a = int(self.count[r])
        n = n_a + n_b
        delta = mean_b - self.mean[r]
        self.mean[r] += delta * (n_b / n)
        scale = n_a * n_b / n
        if self.covariance == "diag":
            self.m2[r] += m2_b + delta.square() * scale
        else:
            self.m2[r] += m2_b + delta[..., :, None] * delta[..., None, :] * scale
        self.count[r] = n

    def reset(self, owner: int | None = None) -> None:
        """Forget the statistics of ``owner`` (None: of every owner)."""
        if owner is None:
            self.count.zero_()
            self.mean.zero_()
            self.m2.zero_()
            return
        r = self.row(owner)
        self.count[r] = 0
        self.mean[r] = 0
        self.m2[r] = 0

    # ----------------------------------------------------- density and sampling
    def usable_owners(self, *, minimum: int = 2) -> list[int]:
        """Owners with at least ``minimum`` recorded queries."""
        return [o for o, n in zip(self.owners, self.count.tolist(), strict=True) if n >= minimum]

    def _cholesky(self, rows: torch.Tensor, min_var: float) -> torch.Tensor:
        """(O, H, d, d) Cholesky factors of the regularised covariances of ``rows``."""
        n = (self.count[rows] - 1).clamp(min=1).to(self.m2)
        cov = self.m2[rows] / n[:, None, None, None]
        eye = torch.eye(self.dim_key, dtype=cov.dtype, device=cov.device)
        return torch.linalg.cholesky(cov + min_var * eye)

    @torch.no_grad()
    def log_likelihood(
        self, queries: torch.Tensor, owners: list[int], *, min_var: float = 1e-4
    ) -> torch.Tensor:
        """Gaussian log-density of each query under each owner, summed over heads.

        Args:
            queries: (T, H, d) queries.
            owners: O owners with at least 2 recorded queries.
            min_var: added to every variance (diagonal of the covariance).

        Returns:
            (T, O) float64 log-likelihoods.
        """
        rows = torch.tensor([self.row(o) for o in owners], device=self.count.device)
        if bool((self.count[rows] < 2).any()):
            raise ValueError(
                f"owners must each have >= 2 recorded queries, got counts "
                f"{self.count[rows].tolist()} for owners {owners}"
            )
        q = queries.detach().to(self.mean)  # (T, H, d)
        mu = self.mean[rows]  # (O, H, d)
        const = self.heads * self.dim_key * math.log(2 * math.pi)
        if self.covariance == "diag":
            n = (self.count[rows] - 1).to(self.m2)
            var = self.m2[rows] / n[:, None, None] + min_var  # (O, H, d)
            inv = var.reciprocal()
            maha = (
                torch.einsum("thd,ohd->to", q.square(), inv)
                - 2 * torch.einsum("thd,ohd->to", q, mu * inv)
                + (mu.square() * inv).sum(dim=(1, 2))
            )
            return -0.5 * (maha + var.log().sum(dim=(1, 2)) + const)
        chol = self._cholesky(rows, min_var)  # (O, H, d, d)
        out = []
        for o in range(len(owners)):  # loop over owners only, not queries
            diff = (q - mu[o]).permute(1, 2, 0)  # (H, d, T)
            z = torch.linalg.solve_triangular(chol[o], diff, upper=False)
            logdet = 2 * chol[o].diagonal(dim1=-2, dim2=-1).log().sum()
            out.append(-0.5 * (z.square().sum(dim=(0, 1)) + logdet + const))
        return torch.stack(out, dim=1)

    # -------------------------------------------------------- module plumbing
    def _apply(self, fn, recurse=True):
        """Move with the layer, but keep the statistics in float64 under ``.half()`` etc."""
        kept = {name: self._buffers[name] for name in _STATS}
        super()._apply(fn, recurse)
        device = self.count.device  # an int buffer: moved, never cast
        for name, buf in kept.items():
            self._buffers[name] = buf.to(device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        """Resize the buffers to the checkpoint's owners before loading them."""
        saved = {name: state_dict.get(prefix + name) for name in ("owner_ids", "count", *_STATS)}
        if all(v is not None for v in saved.values()):
            num = saved["owner_ids"].shape[0]
            for name, value in saved.items():
                mine = getattr(self, name)
                if (
                    value.dim() != mine.dim()
                    or tuple(value.shape[1:]) != tuple(mine.shape[1:])
                    or value.shape[0] != num
                ):
                    raise ValueError(
                        f"{prefix}{name} must have shape ({num}, "
                        f"{', '.join(map(str, mine.shape[1:]))}) (covariance="
                        f"{self.covariance!r}), got {tuple(value.shape)}"
                    )
            for name in saved:
                mine = getattr(self, name)
                setattr(self, name, mine.new_zeros((num, *mine.shape[1:])))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
