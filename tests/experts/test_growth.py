"""Growth keeps identity: ids, sub-keys, weights, Parameter objects and optimizer state."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer, migrate_state


def small(**kw):
    cfg = dict(num_keys=4, heads=2, topk=4, dim_key=8)
    cfg.update(kw)
    return PEER(16, **cfg)


def snapshot(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def test_grow_returns_new_ids_and_appends_a_segment():
    layer = small(capacity=64)
    ids = layer.grow(3, owner=1)
    assert ids.tolist() == list(range(16, 25))
    assert layer.num_experts == 25 and layer.num_segments == 2
    assert layer.segments[-1].tolist() == [4, 3, 3, 16]
    assert layer.owners[16:].tolist() == [1] * 9


def test_grow_never_changes_existing_ids_keys_or_weights():
    layer = small(capacity=64)
    x = torch.randn(30, 16)
    layer.eval()
    before = snapshot(layer)
    keys_before = layer.expert_keys().clone()
    out_before = layer(x, owners=0)
    layer.grow(3, owner=1)
    layer.grow(2, owner=2)
    n = keys_before.shape[0]
    assert torch.equal(layer.expert_keys()[:n], keys_before)
    down, up = layer.expert_weights()
    assert torch.equal(down[:n], before["pool.down"][:n])
    assert torch.equal(up[:n], before["pool.up"][:n])
    assert torch.equal(layer(x, owners=0), out_before)


def test_growth_within_capacity_keeps_parameter_objects():
    layer = small(capacity=100)  # room for 25 sub-keys
    params = {name: p for name, p in layer.named_parameters()}
    ptrs = {name: p.data_ptr() for name, p in params.items()}
    layer.grow(4, owner=1)
    layer.grow(5, owner=2)
    for name, p in layer.named_parameters():
        assert p is params[name], name
        assert p.data_ptr() == ptrs[name], name
    assert layer.replaced_parameters == {}


def test_growth_past_capacity_reallocates_and_migrate_state_keeps_moments():
    layer = small()  # capacity = 16 exactly
    opt = make_optimizer(layer, lr=1e-2)
    x = torch.randn(40, 16)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    old_down = layer.down
    moments = {k: v.clone() for k, v in opt.state[old_down].items()}
    layer.grow(3, owner=1)
    assert layer.down is not old_down and layer.capacity >= 25
    assert set(layer.replaced_parameters) == {"down", "up", "sub_keys"}
    assert migrate_state(opt, layer) == 3
    state = opt.state[layer.down]
    assert torch.equal(state["exp_avg"][:16], moments["exp_avg"])
    assert torch.equal(state["exp_avg_sq"][:16], moments["exp_avg_sq"])
    assert float(state["exp_avg"][16:].abs().sum()) == 0.0
    assert state["step"] == moments["step"]
    assert any(p is layer.down for p in opt.param_groups[0]["params"])
    assert not any(p is old_down for p in opt.param_groups[0]["params"])
    opt.zero_grad()
    layer(x).square().mean().backward()
    opt.step()  # the migrated state has the new shapes


@pytest.mark.parametrize(
    "args,kwargs,exc",
    [
        ((0,), dict(owner=1), ValueError),
        ((2,), dict(owner="new"), TypeError),
        ((2,), dict(owner=-1), ValueError),
        ((2,), dict(owner=1.0), TypeError),
        ((2.5,), dict(owner=1), TypeError),
    ],
)
def test_failed_grow_leaves_the_layer_as_it_was(args, kwargs, exc):
    layer = small(capacity=64)
    before = snapshot(layer)
    params = list(layer.parameters())
    with pytest.raises(exc):
        layer.grow(*args, **kwargs)
    after = snapshot(layer)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(a is b for a, b in zip(params, layer.parameters(), strict=True))


@pytest.mark.parametrize("num_keys", [2, 5])  # within capacity, past capacity
def test_grow_that_fails_midway_rolls_back(monkeypatch, num_keys):
    layer = small(capacity=20)
    layer.reserve(20, 6)
    layer.replaced_parameters = {}
    before = snapshot(layer)
    params = list(layer.parameters())

    def boom(*args, **kwargs):
        raise MemoryError("simulated failure while appending")

    monkeypatch.setattr(layer.pool, "_append_segment", boom)
    with pytest.raises(MemoryError):
        layer.grow(num_keys, owner=1)
    after = snapshot(layer)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(a is b for a, b in zip(params, layer.parameters(), strict=True))
    assert layer.replaced_parameters == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_rows_are_the_documented_draws_in_any_table_dtype(dtype):
    torch.manual_seed(3)
    layer = PEER(12, num_keys=3, heads=2, topk=2, dim_key=8, capacity=40).to(dtype)
    torch.manual_seed(5)
    layer.grow(2, owner=1)  # drawn in place for float32 tables, cast for others
    torch.manual_seed(5)
    down, up = torch.randn(4, 12) / 12**0.5, torch.randn(4, 12) / 2**0.5
    keys = torch.randn(2, 2, 4) / 4**0.5
    assert torch.equal(layer.down.detach()[9:13], down.to(dtype))
    assert torch.equal(layer.up.detach()[9:13], up.to(dtype))
    assert torch.equal(layer.sub_keys.detach()[3:5], keys.to(dtype))
