"""A grown owner's own query network; stored statistics of an old owner's queries or inputs.

With everything old frozen, a grown segment is scored with the old query network, which
was trained on the first domain only: the queries of different domains can overlap, and
then no choice of new sub-keys wins exactly the new domain's inputs. :class:`OwnQuery`
gives each grown owner its own query network (a copy of the layer's query projection and
LayerNorm, trained on that owner's data only), used in the one retrieval over the pool
for that owner's sub-keys only. Old owners keep the shared query, so their scores stay
fixed; the top-k is still one search over every expert, with no owner inference. Not in
the paper.

The layer calls a query adapter as ``adapter(q, owner)`` with the shared query q only, so
:class:`OwnQuery` watches the layer's ``to_query`` (a forward pre-hook) for the inputs x
that q came from. Every query the layer computes passes there (``forward``, ``query``,
``retrieve``); a raw query that does not (e.g. a pseudo-query drawn from statistics)
cannot be scored with it: draw pseudo-inputs from :class:`InputStats` instead.

:class:`CentroidStats` keeps more of an old owner's query distribution than one Gaussian
(:class:`peer_ll.strategies.pool_growth.QueryStats`): k-means centroids per head, each
with the per-dimension spread of its cluster; pseudo-queries are centroids plus noise.

Axis letters: ``T`` inputs, ``D`` input size, ``H`` heads, ``d`` dim_key.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_float, check_int, check_owner, check_type
from peer_ll.experts.segment_init import kmeans


class OwnQuery(nn.Module):
    """Per-owner query networks for a PEER layer's grown owners: (T, H, d) -> (T, H, d).

    Args:
        layer: the PEER layer (its ``query_norm`` must be "layer" or None).
        rank: 0: each owner's projection is a full copy of the layer's (D·H·d weights
            and multiply-adds per input); r > 0: the frozen shared projection plus a
            trainable rank-r residual ``x A_o B_o`` (r·(D + H·d) each), B_o zero at start.

    Owners without a network of their own get the shared query unchanged.
    """

    def __init__(self, layer: PEER, *, rank: int = 0) -> None:
        super().__init__()
        check_type("layer", layer, PEER)
        self.rank = check_int("rank", rank, minimum=0)
        if layer.query_norm_kind not in ("layer", None):
            raise ValueError(
                "layer.query_norm_kind must be 'layer' or None for an own query, got "
                f"{layer.query_norm_kind!r}"
            )
        self.heads, self.dim_key = layer.heads, layer.dim_key
        self.nets = nn.ModuleDict()
        self.seen: torch.Tensor | None = None  # (T, D), the inputs of the last query
        self._template = (layer.to_query, layer.query_norm)
        self._hook = layer.to_query.register_forward_pre_hook(self._see)

    def _see(self, module, args) -> None:
        self.seen = args[0]

    def add_owner(self, owner: int) -> None:
        """Give ``owner`` a query network: a copy of the layer's, so scores start unchanged."""
        owner = check_owner("owner", owner)
        if str(owner) in self.nets:
            raise ValueError(f"owner must not have an own query yet, got {owner}")
        to_query, norm = (copy.deepcopy(m) for m in self._template)
        if self.rank:  # shared projection (called, not copied) + a rank-r residual
            dim, out = to_query.in_features, to_query.out_features
            down = nn.Linear(dim, self.rank, bias=False)
            up = nn.Linear(self.rank, out, bias=False)
            nn.init.zeros_(up.weight)
            to_query = nn.Sequential(down, up)
        net = nn.ModuleDict({"to_query": to_query, "norm": norm})
        for p in net.parameters():
            p.requires_grad_(True)
        self.nets[str(owner)] = net

    def owners(self) -> list[int]:
        """Owners with a query network of their own."""
        return sorted(int(o) for o in self.nets)

    def forward(self, q: torch.Tensor, owner: int) -> torch.Tensor:
        net = self.nets[str(owner)] if str(owner) in self.nets else None
        if net is None:
            return q
        x = self.seen
        if x is None or x.shape[0] * self.heads * self.dim_key != q.numel():
            raise ValueError(
                "q must come from the layer's own query of its inputs for an own query, got "
                f"q of shape {tuple(q.shape)} and last inputs of shape "
                f"{None if x is None else tuple(x.shape)}"
            )
        out = net["to_query"](x)
        if self.rank:
            with torch.no_grad():  # the shared query's projection, outside the hook
                shared = nn.functional.linear(x, self._template[0].weight)
            out = out + shared
        out = out.view(-1, self.heads, self.dim_key)
        return net["norm"](out).view_as(q)

    def remove(self) -> None:
        """Stop watching the layer's inputs."""
        self._hook.remove()


class InputStats:
    """Per-(layer, owner) Gaussian of a layer's inputs: mean (D,), Cholesky (D, D).

    Args:
        ridge: added to each covariance's diagonal, times its mean variance.
    """

    def __init__(self, *, ridge: float = 1e-2) -> None:
        self.ridge = check_float("ridge", ridge, minimum=0.0)
        self.stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: PEER, owner: int, inputs: torch.Tensor) -> None:
        """Store the Gaussian of ``inputs`` (..., D) as ``owner``'s in ``layer``."""
        owner = check_owner("owner", owner)
        x = inputs.detach().reshape(-1, layer.dim).double()
        if len(x) < 2:
            raise ValueError(f"inputs must hold at least 2 inputs, got {len(x)}")
        mean = x.mean(0)
        cov = torch.cov(x.T)
        cov = cov + self.ridge * float(cov.diagonal().mean()) * torch.eye(layer.dim).double()
        self.stats[(id(layer), owner)] = (mean.float(), torch.linalg.cholesky(cov).float())

    def owners(self, layer: PEER) -> list[int]:
        """Owners with stored statistics in ``layer``."""
        return sorted(o for (lid, o) in self.stats if lid == id(layer))

    def sample(self, layer: PEER, owner: int, n: int, generator=None) -> torch.Tensor:
        """(n, D) pseudo-inputs of ``owner`` in ``layer``."""
        mean, chol = self.stats[(id(layer), owner)]
        z = torch.randn(n, len(mean), generator=generator)
        out = mean + z @ chol.T
        return out.to(device=layer.sub_keys.device, dtype=layer.sub_keys.dtype)


class CentroidStats:
    """Per-(layer, owner) k-means centroids of queries, per head: centres and spreads (H, n, d).

    Args:
        centroids: n, centroids per head (fewer when there are fewer queries).
        noise: pseudo-queries are a centroid plus ``noise`` × its cluster's per-dimension
            standard deviation × N(0, 1) (0: the centroids themselves).
        max_points: k-means runs on at most this many queries (a fixed random subset).
        iters: Lloyd iterations.
    """

    def __init__(
        self, *, centroids: int = 256, noise: float = 1.0, max_points: int = 4096, iters: int = 10
    ) -> None:
        self.centroids = check_int("centroids", centroids, minimum=1)
        self.noise = check_float("noise", noise, minimum=0.0)
        self.max_points = check_int("max_points", max_points, minimum=1)
        self.iters = check_int("iters", iters, minimum=0)
        self.stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: PEER, owner: int, queries: torch.Tensor) -> None:
        """Store the centroids of ``queries`` (..., H, d) as ``owner``'s in ``layer``."""
        owner = check_owner("owner", owner)
        q = queries.detach().reshape(-1, layer.heads, layer.dim_key).float().cpu()
        if len(q) < 2:
            raise ValueError(f"queries must hold at least 2 queries, got {len(q)}")
        if len(q) > self.max_points:
            gen = torch.Generator().manual_seed(owner)
            q = q[torch.randperm(len(q), generator=gen)[: self.max_points]]
        n = min(self.centroids, len(q))
        centres, spreads = [], []
        for h in range(layer.heads):
            pts = q[:, h]  # (P, d)
            cent = kmeans(pts, n, iters=self.iters, seed=owner)  # (n, d)
            assign = torch.cdist(pts, cent).argmin(1)
            count = torch.bincount(assign, minlength=n).clamp_min(1)[:, None]
            sq = torch.zeros_like(cent).index_add_(0, assign, (pts - cent[assign]).pow(2))
            centres.append(cent)
            spreads.append((sq / count).sqrt())
        self.stats[(id(layer), owner)] = (torch.stack(centres), torch.stack(spreads))

    def owners(self, layer: PEER) -> list[int]:
        """Owners with stored statistics in ``layer``."""
        return sorted(o for (lid, o) in self.stats if lid == id(layer))

    def sample(self, layer: PEER, owner: int, n: int, generator=None) -> torch.Tensor:
        """(n, H, d) pseudo-queries of ``owner`` in ``layer``: centroids drawn per head."""
        centres, spreads = self.stats[(id(layer), owner)]  # (H, C, d) each
        heads, count, _ = centres.shape
        pick = torch.randint(count, (n, heads), generator=generator)  # (n, H)
        head = torch.arange(heads)[None, :]
        out = centres[head, pick]  # (n, H, d)
        if self.noise:
            z = torch.randn(out.shape, generator=generator)
            out = out + self.noise * spreads[head, pick] * z
        return out.to(device=layer.sub_keys.device, dtype=layer.sub_keys.dtype)
