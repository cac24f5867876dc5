"""Own query networks and input statistics for growth into one pool."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.strategies.pool_growth import PoolGrowth, PoolGrowthConfig
from peer_ll.strategies.pool_growth_query import InputStats, OwnQuery

OWN = dict(calibrate=False, own_query=True, pseudo="inputs", margin=1.0, pseudo_queries=128)


def hidden_domains():
    """Two domains that the layer's query network cannot tell apart.

    They differ only in the null space of ``to_query`` (D = 32 > H·d = 16), so their
    shared queries have one distribution.
    """
    layer = PEER(
        32, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer", capacity=64, backend="torch"
    )
    layer.sparse_grad = False
    null = torch.linalg.svd(layer.to_query.weight.detach(), full_matrices=True)[2][16:]  # (16, 32)
    shift = 3 * torch.randn(16) @ null
    base = lambda: torch.randn(300, 16) @ layer.to_query.weight.detach()  # noqa: E731
    return layer, base() + shift + 0.3 * torch.randn(300, 16) @ null, base() - shift


def share(layer, x, owner):
    _, ids = layer.retrieve(x)
    return float((layer.owners[ids] == owner).float().mean())


@pytest.mark.parametrize("rank", [0, 3])
def test_own_query_starts_as_the_shared_query_and_checks_its_inputs(rank):
    layer, old, _ = hidden_domains()
    own = OwnQuery(layer, rank=rank)
    own.add_owner(1)
    q = layer.query(old)  # (300, 2, 8), through to_query: own sees old
    assert torch.allclose(own(q, 1), q, atol=1e-6) and own(q, 0) is q
    assert own.owners() == [1]
    with pytest.raises(ValueError, match="owner must not have an own query yet, got 1"):
        own.add_owner(1)
    with pytest.raises(ValueError, match="q must come from the layer's own query"):
        own(q[:5], 1)
    params = sum(p.numel() for p in own.nets["1"]["to_query"].parameters())
    assert params == (3 * (32 + 16) if rank else 32 * 16)  # rank·(D + H·d) or D·H·d
    own.remove()
    bn = PEER(8, num_keys=2, heads=1, topk=2, dim_key=4, query_norm="batch")
    with pytest.raises(ValueError, match="query_norm_kind must be 'layer' or None"):
        OwnQuery(bn)


@pytest.mark.parametrize("rank", [0, 4])
def test_own_query_separates_domains_that_share_their_queries(rank):
    layer, old, new = hidden_domains()
    growth = PoolGrowth(PoolGrowthConfig(**OWN, own_query_rank=rank))
    with torch.no_grad():
        growth.record(layer, 0, layer.query(old), inputs=old)
        growth.grow(layer, 4, owner=1, queries=layer.query(new))
    layer.freeze(0, keys=True, query=True)
    assert isinstance(layer.query_adapter, OwnQuery)
    params = [layer.sub_keys, *layer.query_adapter.nets["1"].parameters()]
    opt = torch.optim.Adam(params, lr=0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = growth.loss(layer, layer.query(new).detach(), owner=1, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert share(layer, new, 1) > 0.9  # new inputs reach the new segment
    assert share(layer, old, 0) > 0.9  # and the old ones stay with the old keys


def test_far_kmeans_uses_the_queries_old_keys_score_lowest():
    layer, old, new = hidden_domains()
    growth = PoolGrowth(PoolGrowthConfig(calibrate=False, far_fraction=0.25))
    layer.grow(4, owner=1)
    q = layer.query(torch.cat([old, new])).detach()
    far = growth._far(layer, q, owner=1)
    assert far.shape == (150, 2, 8)
    best_far = layer._search(far, layer.segments[:1], None, 1)[0].max()
    best_all = layer._search(q, layer.segments[:1], None, 1)[0].median()
    assert best_far <= best_all


def test_input_stats_sample_the_recorded_gaussian():
    layer, old, _ = hidden_domains()
    stats = InputStats(ridge=0.0)
    stats.record(layer, 0, old)
    x = stats.sample(layer, 0, 4000, torch.Generator().manual_seed(1))
    assert x.shape == (4000, 32) and stats.owners(layer) == [0]
    assert torch.allclose(x.mean(0), old.mean(0), atol=0.3)
    with pytest.raises(ValueError, match="inputs must hold at least 2 inputs, got 1"):
        stats.record(layer, 1, old[:1])


def test_config_checks_the_new_switches():
    with pytest.raises(ValueError, match="calibrate must be False with own_query=True"):
        PoolGrowthConfig(own_query=True)
    with pytest.raises(ValueError, match="pseudo must be 'inputs' with own_query=True"):
        PoolGrowthConfig(own_query=True, calibrate=False)
    with pytest.raises(ValueError, match=r"far_fraction must be in \(0, 1\], got 1.5"):
        PoolGrowthConfig(far_fraction=1.5)
    with pytest.raises(ValueError, match="pseudo must be one of"):
        PoolGrowthConfig(pseudo="outputs")
