"""Growth into one pool: new experts that win exactly the new domain's queries.

The paper's literal growth appends experts and sub-keys to one pool and keeps one
top-k retrieval over all of it: no task label, no owner inference, no second forward.
Everything old frozen, it fails two ways: random new sub-keys lose every query (the new
experts starve) or, trained freely, win the old domains' queries too (they steal).
:class:`PoolGrowth` combines three remedies, each a switch of :class:`PoolGrowthConfig`:

- ``kmeans``: the new segment's sub-keys start at k-means centroids of the new data's
  query halves (:func:`peer_ll.experts.segment_init.kmeans_sub_keys`), at the old
  sub-keys' norm times ``key_scale``;
- ``calibrate``: the new owner gets a per-dimension query scale and shift used only for
  its own sub-keys (a :class:`peer_ll.experts.PerOwner` of
  :class:`peer_ll.experts.QueryAdapter`, with a low-rank
  residual if ``calibration_rank``), learned on the new data; old owners have none, so
  old scores stay fixed. Not in the paper;
- a retrieval-level regulariser on the current data only (no replay), :meth:`loss`:
  ``win``: the new segment's top-k scores beat the old top-1 by ``margin`` on current
  queries; ``keep``: on pseudo-queries drawn from Gaussians of each old owner's queries
  (:class:`QueryStats`, stored when that owner finished training), the new segment's
  best score stays ``margin`` below the old k-th score, so old top-k are unchanged.
  With ``pseudo="inputs"`` the pseudo-queries are the layer's queries of pseudo-inputs
  drawn from Gaussians of each old owner's inputs (:class:`InputStats`); with
  ``pseudo="centroids"`` they are k-means centroids of each old owner's queries (``centroids``
  per head) plus ``centroid_noise`` × their cluster's spread (:class:`CentroidStats`);

and two that attack what those leave, the overlap of old and new queries under the
frozen query network (not in the paper):

- ``own_query``: the new owner scores its own sub-keys with a query network of its own
  (:class:`peer_ll.strategies.pool_growth_query.OwnQuery`, a copy of the layer's,
  trained on the new data), in the same single retrieval; needs ``pseudo="inputs"``;
- ``far_fraction`` < 1: k-means only on the new queries that the old keys score lowest
  (that fraction of them), so the new keys sit away from the old queries;
- ``copy_experts``: each new expert starts as a copy of the old expert that its key
  retrieves (:func:`peer_ll.experts.segment_init.copy_nearest_experts`), so a token the
  new keys win starts near its old output instead of random experts'.

Axis letters: ``T`` queries, ``H`` heads, ``d`` dim_key, ``k`` top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peer_ll.experts import PEER, PerOwner, QueryAdapter
from peer_ll.experts.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_owner,
    check_type,
)
from peer_ll.experts.segment_init import (
    copy_nearest_experts,
    kmeans_sub_keys,
    scores_of,
    search_queries,
)
from peer_ll.strategies.pool_growth_query import CentroidStats, InputStats, OwnQuery


@dataclass(frozen=True)
class PoolGrowthConfig:
    """Switches of :class:`PoolGrowth` (all on: the full method; all off: the paper)."""

    kmeans: bool = True  # new sub-keys at k-means centroids of the new queries' halves
    key_scale: float = 1.0  # new sub-key norm / old sub-key mean norm
    calibrate: bool = True  # per-owner query scale and shift for the new sub-keys
    calibration_rank: int = 8  # and a rank-r residual on that query (0: scale and shift)
    win_weight: float = 1.0  # regulariser: new top-k over old top-1 on current queries
    keep_weight: float = 1.0  # regulariser: new top-1 under old k-th on pseudo-queries
    margin: float = 1.0  # score margin of both terms
    pseudo_queries: int = 256  # pseudo-queries per old owner and step
    pseudo: str = "queries"  # from query/input Gaussians ("queries"/"inputs") or "centroids"
    centroids: int = 256  # pseudo="centroids": k-means centroids per old owner, layer and head
    centroid_noise: float = 1.0  # and the noise around them, in units of their cluster's std
    own_query: bool = False  # the new owner's own query network for its sub-keys
    own_query_rank: int = 0  # 0: a full copy of the query projection; r: shared + rank r
    far_fraction: float = 1.0  # k-means on the new queries the old keys score lowest
    copy_experts: bool = False  # new experts start as the old experts their keys retrieve

    def __post_init__(self) -> None:
        check_bool("kmeans", self.kmeans)
        check_bool("calibrate", self.calibrate)
        check_bool("copy_experts", self.copy_experts)
        check_float("key_scale", self.key_scale, minimum=0.0)
        check_float("win_weight", self.win_weight, minimum=0.0)
        check_float("keep_weight", self.keep_weight, minimum=0.0)
        check_float("margin", self.margin, minimum=0.0)
        check_int("pseudo_queries", self.pseudo_queries, minimum=1)
        check_int("calibration_rank", self.calibration_rank, minimum=0)
        check_choice("pseudo", self.pseudo, ("queries", "inputs", "centroids"))
        check_int("centroids", self.centroids, minimum=1)
        check_float("centroid_noise", self.centroid_noise, minimum=0.0)
        check_bool("own_query", self.own_query)
        check_int("own_query_rank", self.own_query_rank, minimum=0)
        check_float("far_fraction", self.far_fraction, minimum=0.0)
        if not 0.0 < self.far_fraction <= 1.0:
            raise ValueError(f"far_fraction must be in (0, 1], got {self.far_fraction}")
        if self.own_query and self.calibrate:
            raise ValueError("calibrate must be False with own_query=True, got True")
        if self.own_query and self.keep_weight > 0 and self.pseudo != "inputs":
            raise ValueError(
                "pseudo must be 'inputs' with own_query=True and keep_weight > 0, "
                f"got {self.pseudo!r}"
            )

    @property
    def regularised(self) -> bool:
        """Whether :meth:`PoolGrowth.loss` adds anything."""
        return self.win_weight > 0 or self.keep_weight > 0


#: The measured best on Permuted Fashion-MNIST (benchmarks/RESULTS.md): own query network,
#: k-means keys, the regulariser with pseudo-inputs.
OWN_QUERY = PoolGrowthConfig(calibrate=False, own_query=True, pseudo="inputs")


class QueryStats:
    """Per-(layer, owner) Gaussian of queries, per head: mean (H, d), Cholesky (H, d, d).

    Args:
        ridge: added to each covariance's diagonal (keeps it positive definite).
    """

    def __init__(self, *, ridge: float = 1e-3) -> None:
        self.ridge = check_float("ridge", ridge, minimum=0.0)
        self.stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: PEER, owner: int, queries: torch.Tensor) -> None:
        """Store the Gaussian of ``queries`` (..., H, d) as ``owner``'s in ``layer``."""
        owner = check_owner("owner", owner)
        q = queries.detach().reshape(-1, layer.heads, layer.dim_key).float()
        if len(q) < 2:
            raise ValueError(f"queries must hold at least 2 queries, got {len(q)}")
        mean = q.mean(0)  # (H, d)
        centred = (q - mean).transpose(0, 1)  # (H, T, d)
        cov = centred.transpose(1, 2) @ centred / (len(q) - 1)  # (H, d, d)
        cov = cov + self.ridge * torch.eye(layer.dim_key)
        self.stats[(id(layer), owner)] = (mean, torch.linalg.cholesky(cov))

    def owners(self, layer: PEER) -> list[int]:
        """Owners with stored statistics in ``layer``."""
        return sorted(o for (lid, o) in self.stats if lid == id(layer))

    def sample(self, layer: PEER, owner: int, n: int, generator=None) -> torch.Tensor:
        """(n, H, d) pseudo-queries of ``owner`` in ``layer``."""
        mean, chol = self.stats[(id(layer), owner)]
        z = torch.randn(n, *mean.shape, generator=generator)  # (n, H, d)
        out = mean + torch.einsum("hij,nhj->nhi", chol, z)
        return out.to(device=layer.sub_keys.device, dtype=layer.sub_keys.dtype)


class PoolGrowth:
    """Grow PEER layers into one pool so that new experts win only new queries.

    Args:
        config: a :class:`PoolGrowthConfig`.

    Use per layer and domain: :meth:`grow` (with queries of the new data) before
    training, add :meth:`loss` to the training loss, :meth:`record` after training.
    """

    def __init__(self, config: PoolGrowthConfig | None = None) -> None:
        self.config = (
            PoolGrowthConfig() if config is None else check_type("config", config, PoolGrowthConfig)
        )
        self.query_stats = QueryStats()
        self.input_stats = InputStats()
        self.centroid_stats = CentroidStats(
            centroids=self.config.centroids, noise=self.config.centroid_noise
        )

    def grow(
        self, layer: PEER, num_keys: int, *, owner: int, queries: torch.Tensor
    ) -> torch.Tensor:
        """Grow ``layer`` by ``num_keys``² experts of ``owner``; returns their ids.

        Args:
            layer: the PEER layer.
            num_keys: sub-keys per side of the new segment.
            owner: the new owner.
            queries: (..., H, d) queries of the new data (for k-means).
        """
        check_type("layer", layer, PEER)
        kind = OwnQuery if self.config.own_query else PerOwner
        if (self.config.calibrate or self.config.own_query) and not isinstance(
            layer.query_adapter, kind | None
        ):
            raise ValueError(
                f"layer.query_adapter must be None or a {kind.__name__} with this config, "
                f"got {type(layer.query_adapter).__name__}"
            )
        ids = layer.grow(num_keys, owner=owner)
        self.init_grown(layer, owner=owner, queries=queries)
        return ids

    def init_grown(self, layer: PEER, *, owner: int, queries: torch.Tensor) -> None:
        """Set up ``owner``'s segment, just grown by anything: k-means keys, calibration."""
        check_type("layer", layer, PEER)
        if self.config.kmeans:
            old = layer.sub_keys.detach()[: int(layer.segments[-1, 0])]
            norm = float(old.norm(dim=-1).mean()) * self.config.key_scale if len(old) else None
            kmeans_sub_keys(layer, self._far(layer, queries, owner), owner=owner, norm=norm)
        if self.config.own_query:
            if layer.query_adapter is None:
                layer.attach_query_adapter(OwnQuery(layer, rank=self.config.own_query_rank))
            layer.query_adapter.add_owner(owner)
        elif self.config.calibrate and layer.query_adapter is None:

            def adapter() -> QueryAdapter:  # identity at init; old owners have none
                return QueryAdapter(
                    layer.heads, layer.dim_key, rank=self.config.calibration_rank, affine=True
                )

            layer.attach_query_adapter(
                PerOwner(adapter(), owner=owner, new=adapter, unknown="identity")
            )
        elif isinstance(layer.query_adapter, PerOwner) and layer.query_adapter.unknown != "first":
            # as models' grow_peer (unknown "first": every owner shares the first's)
            layer.query_adapter.add_owner(owner)
        if self.config.copy_experts:
            copy_nearest_experts(layer, owner=owner)

    def _far(self, layer: PEER, queries: torch.Tensor, owner: int) -> torch.Tensor:
        """The ``far_fraction`` of ``queries`` (..., H, d) that old keys score lowest."""
        frac = self.config.far_fraction
        old = [o for o in set(layer.segment_owner.tolist()) if o != owner]
        if frac >= 1.0 or not old:
            return queries
        heads, d = layer.heads, layer.dim_key
        q = queries.detach().reshape(-1, heads, d)
        best, _ = search_queries(layer, q, owners=old, k=1)  # (T, H, 1)
        keep = max(heads, int(frac * best.numel()) // heads * heads)
        pick = best.reshape(-1).argsort()[:keep]
        return q.reshape(-1, d)[pick].view(-1, heads, d)

    def record(
        self, layer: PEER, owner: int, queries: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> None:
        """Store ``owner``'s query (and input) statistics when it has finished training.

        Args:
            layer: the PEER layer.
            owner: the owner that finished.
            queries: (..., H, d) its queries.
            inputs: (..., D) the layer's inputs they came from (for ``pseudo="inputs"``).
        """
        self.query_stats.record(layer, owner, queries)
        if self.config.pseudo == "centroids":
            self.centroid_stats.record(layer, owner, queries)
        if inputs is not None:
            self.input_stats.record(layer, owner, inputs)

    def loss(self, layer: PEER, q: torch.Tensor, *, owner: int, generator=None) -> torch.Tensor:
        """Retrieval regulariser of ``owner``'s segment on current queries q (..., H, d).

        Returns a scalar: ``win_weight · win + keep_weight · keep`` (see the module
        docstring); 0 when ``owner`` holds the only segment.
        """
        cfg = self.config
        q = q.reshape(-1, layer.heads, layer.dim_key)
        owners = sorted(set(layer.segment_owner.tolist()))
        old = [o for o in owners if o != owner]
        total = q.new_zeros(())
        if not old or owner not in owners:
            return total
        k = layer.topk
        if cfg.win_weight > 0:
            s_old, _ = search_queries(layer, q, owners=old, k=1)  # (T, H, 1)
            _, ids = search_queries(layer, q, owners=owner, k=k)
            s_new = scores_of(layer, q, ids)  # (T, H, k), differentiable
            total = total + cfg.win_weight * F.softplus(s_old + cfg.margin - s_new).mean()
        stats = {"inputs": self.input_stats, "centroids": self.centroid_stats}.get(
            cfg.pseudo, self.query_stats
        )
        known = [o for o in stats.owners(layer) if o in old]
        if cfg.keep_weight > 0 and known:
            p = torch.cat([stats.sample(layer, o, cfg.pseudo_queries, generator) for o in known])
            if cfg.pseudo == "inputs":  # (P, D) -> (P, H, d), through the layer's query
                with torch.no_grad():
                    p = layer.query(p).reshape(-1, layer.heads, layer.dim_key)
            s_old, _ = search_queries(layer, p, owners=old, k=k)
            _, ids = search_queries(layer, p, owners=owner, k=1)
            s_new = scores_of(layer, p, ids)  # (P, H, 1)
            total = (
                total + cfg.keep_weight * F.softplus(s_new - s_old[..., -1:] + cfg.margin).mean()
            )
        return total
