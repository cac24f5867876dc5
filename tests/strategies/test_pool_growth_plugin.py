"""PoolGrowthPlugin: growth into one pool in an Avalanche strategy."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from peer_ll.models.classifier import PEERClassifier
from peer_ll.optim import make_optimizer
from peer_ll.strategies import GrowthPolicy, attach_growth
from peer_ll.strategies.pool_growth import OWN_QUERY, PoolGrowth, PoolGrowthConfig
from peer_ll.strategies.pool_growth_plugin import PoolGrowthPlugin


@pytest.mark.parametrize("config", [PoolGrowthConfig(), OWN_QUERY], ids=["calibrate", "own"])
def test_plugin_grows_initialises_freezes_and_regularises(domain_stream, small_peer, config):
    model = PEERClassifier(64, 4, hidden=32, peer={**small_peer, "query_norm": "layer"})
    model.blocks[0].peer.sparse_grad = False
    attach_growth(model, GrowthPolicy(max_experts=64))
    plugin = PoolGrowthPlugin(PoolGrowth(config), query_samples=64)
    strategy = Naive(
        model=model,
        optimizer=make_optimizer(model, lr=1e-2),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        plugins=[plugin],
        evaluator=None,
    )
    layer = model.blocks[0].peer
    first = domain_stream.train_stream[0]
    strategy.train(first)
    old = {
        k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }  # not the growth state (a dict)
    strategy.train(domain_stream.train_stream[1])
    assert layer.num_segments == 2 and int(layer.segment_owner[-1]) == 1
    key_off = int(layer.segments[-1, 0])
    new_keys = layer.sub_keys.detach()[key_off : key_off + 4]
    # k-means keys all carry the old sub-keys' mean norm; training moved them off it a little
    assert new_keys.norm(dim=-1).std() < 0.5 * new_keys.norm(dim=-1).mean()
    assert plugin.last_loss > 0.0  # the regulariser ran on the second experience
    new = model.state_dict()
    for name, value in old.items():  # everything old is frozen
        if name.endswith(("pool.down", "pool.up", "pool.sub_keys")):
            rows = {"pool.sub_keys": key_off}.get(name.split("peer.")[-1], 16)
            assert torch.equal(new[name][:rows], value[:rows]), name
        elif "query_adapter" not in name and name in new and value.is_floating_point():
            assert torch.equal(new[name], value), name
    assert plugin.growth.query_stats.owners(layer) == [0, 1]
    assert plugin.growth.input_stats.owners(layer) == [0, 1]
    if config.own_query:  # the new owner's query network trained; the shared one did not
        own = layer.query_adapter.nets["1"]["to_query"].weight
        assert not torch.equal(own, layer.to_query.weight)


def test_peer_grow_pool_puts_its_plugin_first_and_needs_a_pool_model(small_peer):
    from peer_ll.strategies import peer_classifier
    from peer_ll.strategies.pool_growth_plugin import peer_grow_pool

    model = peer_classifier(64, 4, hidden=32, peer=small_peer, head="fixed", growth="pool")
    extra = [CountingPlugin()]
    strategy = peer_grow_pool(model, query_samples=32, plugins=extra, train_mb_size=8)
    kinds = [type(p).__name__ for p in strategy.plugins]
    assert kinds.index("PoolGrowthPlugin") < kinds.index("CountingPlugin")
    assert extra == [extra[0]]  # the caller's list is not mutated
    owner_model = peer_classifier(64, 4, hidden=32, peer=small_peer, head="fixed")
    with pytest.raises(ValueError, match="model.growth must be 'pool' for peer_grow_pool, got"):
        peer_grow_pool(owner_model)


class CountingPlugin(SupervisedPlugin):
    calls = 0
