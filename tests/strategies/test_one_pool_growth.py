"""PoolGrowth: one retrieval over a grown pool, new experts winning only new queries."""

import pytest
import torch

from peer_ll.experts import PEER, PerOwner
from peer_ll.strategies.pool_growth import PoolGrowth, PoolGrowthConfig, QueryStats


def layer_and_domains():
    layer = PEER(
        16, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer", capacity=64, backend="torch"
    )
    layer.sparse_grad = False
    old = torch.randn(300, 16) + 2 * torch.randn(16)
    new = torch.randn(300, 16) + 2 * torch.randn(16)
    return layer, old, new


def share(layer, x, owner):
    _, ids = layer.retrieve(x)
    return float((layer.owners[ids] == owner).float().mean())


def test_grow_attaches_calibration_that_leaves_old_scores_fixed():
    layer, old, new = layer_and_domains()
    s0, i0 = layer.retrieve(old)
    growth = PoolGrowth()
    with torch.no_grad():
        ids = growth.grow(layer, 4, owner=1, queries=layer.query(new))
    assert ids.tolist() == list(range(16, 32))
    assert isinstance(layer.query_adapter, PerOwner) and 1 in layer.query_adapter.owners
    s, i = layer.retrieve(old, 0)  # owner 0's scores: no adapter, unchanged
    assert torch.equal(i, i0) and torch.allclose(s, s0)


def test_loss_is_zero_for_a_single_segment():
    layer, old, _ = layer_and_domains()
    assert float(PoolGrowth().loss(layer, layer.query(old), owner=0)) == 0.0


def test_regulariser_makes_new_experts_win_new_queries_and_not_old_ones():
    layer, old, new = layer_and_domains()
    growth = PoolGrowth(PoolGrowthConfig(margin=1.0))
    with torch.no_grad():
        growth.record(layer, 0, layer.query(old))
        growth.grow(layer, 4, owner=1, queries=layer.query(new))
    layer.freeze(0, keys=True, query=True)
    assert share(layer, old, 0) < 0.5  # k-means keys alone steal the old domain's queries
    params = [layer.sub_keys, *layer.query_adapter.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    first = None
    for _ in range(60):
        loss = growth.loss(layer, layer.query(new).detach(), owner=1)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first / 2
    assert share(layer, new, 1) > 0.9  # the new domain goes to the new segment
    assert share(layer, old, 0) > 0.9  # the old domain keeps the old one


def test_query_stats_sample_matches_recorded_moments():
    layer, old, _ = layer_and_domains()
    stats = QueryStats()
    q = layer.query(old).detach()
    stats.record(layer, 0, q)
    p = stats.sample(layer, 0, 20000, generator=torch.Generator().manual_seed(0))
    assert p.shape == (20000, 2, 8) and stats.owners(layer) == [0]
    # 20000 draws: the sample mean is within ~4 standard errors of the recorded one
    se = q.std(0) / 20000**0.5
    assert ((p.mean(0) - q.mean(0)).abs() < 4 * se + 1e-4).all()
    with pytest.raises(ValueError, match="queries must hold at least 2"):
        stats.record(layer, 1, q[:1])


def test_config_checks():
    with pytest.raises(ValueError, match="margin must be"):
        PoolGrowthConfig(margin=-1.0)
    with pytest.raises(TypeError, match="kmeans must be a bool"):
        PoolGrowthConfig(kmeans=1)
    with pytest.raises(TypeError, match="config must be"):
        PoolGrowth({"kmeans": True})
    assert not PoolGrowthConfig(win_weight=0.0, keep_weight=0.0).regularised
