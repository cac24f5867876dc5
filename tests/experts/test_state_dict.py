"""state_dict round trip of a grown layer into a freshly built one."""

import pytest
import torch

from peer_ll.experts import PEER

CFG = dict(num_keys=4, heads=2, topk=4, dim_key=8)


def test_fresh_layer_loads_a_grown_state_dict_and_matches():
    layer = PEER(16, **CFG)
    layer.grow(3, owner=1)
    layer.grow(5, owner=2)  # past capacity: reallocated
    layer.freeze(1)
    layer(torch.randn(64, 16))  # update BatchNorm statistics
    fresh = PEER(16, **CFG)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_experts == layer.num_experts and fresh.capacity == layer.capacity
    assert torch.equal(fresh.owners, layer.owners) and torch.equal(fresh.frozen, layer.frozen)
    layer.eval()
    fresh.eval()
    x = torch.randn(25, 16)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh(x, owners=[1, 2]), layer(x, owners=[1, 2]))


def test_state_dict_survives_torch_save(tmp_path):
    layer = PEER(16, **CFG)
    layer.grow(2, owner=3)
    torch.save(layer.state_dict(), tmp_path / "peer.pt")
    fresh = PEER(16, **CFG)
    fresh.load_state_dict(torch.load(tmp_path / "peer.pt"))
    layer.eval()
    fresh.eval()
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(dim=16, num_keys=5), "do not extend this layer's segments"),
        (dict(dim=12, num_keys=4), r"down must have shape \(rows, 12\), got \(24, 16\)"),
        (dict(dim=16, num_keys=4, dim_key=6), "sub_keys must have shape"),
    ],
)
def test_mismatched_state_dict_gives_a_clear_error(other, match):
    layer = PEER(16, **CFG)
    layer.grow(2, owner=1)
    cfg = dict(CFG, **{k: v for k, v in other.items() if k != "dim"})
    fresh = PEER(other["dim"], **cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(layer.state_dict())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_checkpoints_of_the_flat_layout_still_load():
    """Before the pool was a submodule its tables sat on the layer; query statistics too."""
    layer = PEER(16, **CFG)
    layer.grow(3, owner=1)
    layer.grow(5, owner=2)  # past capacity: reallocated
    layer.freeze(1)
    layer(torch.randn(64, 16))
    flat = {k.removeprefix("pool."): v for k, v in layer.state_dict().items()}
    flat["query_stats.mean_0"] = torch.zeros(2, 8)  # per-owner statistics: dropped
    fresh = PEER(16, **CFG)
    fresh.load_state_dict(flat)
    assert torch.equal(fresh.owners, layer.owners) and torch.equal(fresh.frozen, layer.frozen)
    assert fresh.router_mass.shape == (fresh.capacity,)
    layer.eval()
    fresh.eval()
    x = torch.randn(9, 16)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh(x, owners=1), layer(x, owners=1))
