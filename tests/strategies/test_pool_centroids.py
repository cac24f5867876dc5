"""Pseudo-queries from k-means centroids of an old owner's queries (pseudo="centroids")."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.strategies.pool_growth import PoolGrowth, PoolGrowthConfig
from peer_ll.strategies.pool_growth_query import CentroidStats


def clustered(n=600, heads=2, d=8, spread=0.05):
    """(n, H, d) queries in 3 tight clusters per head, and the (H, 3, d) centres."""
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(heads, 3, d, generator=gen)
    pick = torch.randint(3, (n, heads), generator=gen)
    q = centres[torch.arange(heads), pick] + spread * torch.randn(n, heads, d, generator=gen)
    return q, centres


def layer():
    out = PEER(16, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer", capacity=64,
               backend="torch")  # fmt: skip
    out.sparse_grad = False
    return out


def nearest(p, centres):
    """(n, H) distance of each pseudo-query to the nearest centre of its head."""
    return torch.stack([torch.cdist(p[:, h], centres[h]).min(1).values for h in range(2)], 1)


def test_centroids_without_noise_sit_on_the_clusters_and_noise_has_their_spread():
    q, centres = clustered()
    gen, lay = torch.Generator().manual_seed(1), layer()
    exact = CentroidStats(centroids=3, noise=0.0)
    exact.record(lay, 0, q)
    p = exact.sample(lay, 0, 500, generator=gen)
    assert p.shape == (500, 2, 8)
    assert (nearest(p, centres) < 0.05).all()  # a Gaussian would fill the space between
    noisy = CentroidStats(centroids=3, noise=1.0)
    noisy.record(lay, 0, q)
    p = noisy.sample(lay, 0, 3000, generator=gen)
    per_dim = nearest(p, centres) / 8**0.5  # about the clusters' std, 0.05
    assert 0.035 < float(per_dim.pow(2).mean().sqrt()) < 0.065
    with pytest.raises(ValueError, match="queries must hold at least 2"):
        noisy.record(lay, 1, q[:1])


def test_regulariser_with_centroids_keeps_old_queries_and_wins_new_ones():
    torch.manual_seed(0)
    lay = layer()
    old = torch.randn(300, 16) + 2 * torch.randn(16)
    new = torch.randn(300, 16) + 2 * torch.randn(16)
    growth = PoolGrowth(PoolGrowthConfig(margin=1.0, pseudo="centroids", centroids=32))
    with torch.no_grad():
        growth.record(lay, 0, lay.query(old))
        growth.grow(lay, 4, owner=1, queries=lay.query(new))
    assert growth.centroid_stats.owners(lay) == [0]
    lay.freeze(0, keys=True, query=True)
    opt = torch.optim.Adam([lay.sub_keys, *lay.query_adapter.parameters()], lr=0.05)
    for _ in range(60):
        loss = growth.loss(lay, lay.query(new).detach(), owner=1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def share(x, owner):
        _, ids = lay.retrieve(x)
        return float((lay.owners[ids] == owner).float().mean())

    assert share(new, 1) > 0.9 and share(old, 0) > 0.9


def test_config_checks_centroid_settings():
    with pytest.raises(ValueError, match="pseudo must be one of"):
        PoolGrowthConfig(pseudo="gaussian")
    with pytest.raises(ValueError, match="centroids must be"):
        PoolGrowthConfig(centroids=0)
    with pytest.raises(ValueError, match="centroid_noise must be"):
        PoolGrowthConfig(centroid_noise=-1.0)


def test_copy_experts_starts_new_experts_as_old_ones():
    lay = layer()
    new = torch.randn(100, 16) + 1.0
    growth = PoolGrowth(PoolGrowthConfig(copy_experts=True))
    with torch.no_grad():
        ids = growth.grow(lay, 4, owner=1, queries=lay.query(new))
    rows = lay.down.detach()
    match = (rows[ids][:, None] == rows[:16][None]).all(-1)  # (16 new, 16 old)
    assert bool(match.any(1).all())  # every new expert is a copy of an old one
