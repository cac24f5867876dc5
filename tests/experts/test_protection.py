"""Key protection and plasticity: key-margin loss, per-owner query adapters, old outputs."""

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER, QueryAdapter, key_margin_loss
from peer_ll.optim import make_optimizer

HEADS, DIM_KEY = 2, 8


def layer_with_old_owner(**kw) -> tuple[PEER, torch.Tensor]:
    """Owner 0 with keys along its (tight) query cluster, frozen; owner 1 grown."""
    args = dict(num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY, query_norm=None)
    args.update(kw)
    layer = PEER(HEADS * DIM_KEY, **args)
    with torch.no_grad():
        layer.to_query.weight.copy_(torch.eye(HEADS * DIM_KEY))
    centre = torch.randn(DIM_KEY)
    centre = 2 * centre / centre.norm()
    x = (centre + 0.05 * torch.randn(200, HEADS, DIM_KEY)).reshape(200, -1)
    with torch.no_grad():
        layer.sub_keys[:4, 0] = centre[:4] + 0.1 * torch.randn(4, 4)
        layer.sub_keys[:4, 1] = centre[4:] + 0.1 * torch.randn(4, 4)
    layer(x)  # training forward: statistics of owner 0
    layer.freeze(0)
    layer.grow(4, owner=1)
    return layer, centre


def set_new_keys(layer: PEER, direction: torch.Tensor) -> None:
    off = int(layer.segments[1, 0])
    with torch.no_grad():
        layer.sub_keys[off:off + 4, 0] = direction[:4]
        layer.sub_keys[off:off + 4, 1] = direction[4:]


def test_key_margin_loss_is_zero_below_and_positive_above():
    layer, centre = layer_with_old_owner()
    set_new_keys(layer, -centre)  # new keys score old queries far below the old keys
    loss = key_margin_loss(layer, new_owner=1, num_samples=64)
    assert loss.item() == 0.0
    loss = key_margin_loss(layer, new_owner=1, num_samples=64, margin=100.0)
    assert loss.item() > 0  # the same keys violate a margin larger than the score gap
    set_new_keys(layer, 3 * centre)  # new keys outscore the old ones on old queries
    loss = key_margin_loss(layer, new_owner=1, num_samples=64)
    assert loss.item() > 1.0
    loss.backward()
    grad = layer.sub_keys.grad
    off = int(layer.segments[1, 0])
    assert grad[:off].abs().sum() == 0  # old (frozen) keys get nothing
    assert grad[off:off + 4].abs().sum() > 0


def test_minimising_the_key_margin_loss_pushes_new_keys_below_old_scores():
    layer, centre = layer_with_old_owner()
    set_new_keys(layer, 3 * centre)
    opt = torch.optim.SGD([layer.sub_keys], lr=0.5)
    first = key_margin_loss(layer, new_owner=1, num_samples=64).item()
    for _ in range(30):
        opt.zero_grad()
        key_margin_loss(layer, new_owner=1, num_samples=64).backward()
        opt.step()
    assert key_margin_loss(layer, new_owner=1, num_samples=64).item() < 0.05 * first


def test_key_margin_loss_argument_errors():
    layer, _ = layer_with_old_owner()
    with pytest.raises(ValueError, match="new_owner must be among"):
        key_margin_loss(layer, new_owner=5)
    with pytest.raises(ValueError, match="old_owners must have query statistics"):
        key_margin_loss(layer, new_owner=1, old_owners=[1])
    nothing = key_margin_loss(layer, new_owner=0)  # owner 1 has no statistics yet
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_query_adapter_is_identity_at_init_and_used_only_for_its_owner():
    adapter = QueryAdapter(HEADS, DIM_KEY, rank=2, affine=True)
    q = torch.randn(5, HEADS, DIM_KEY)
    assert torch.equal(adapter(q), q)
    layer, centre = layer_with_old_owner(query_adapter_rank=2)
    assert sorted(layer.query_adapters) == ["0", "1"]
    x = torch.randn(7, HEADS * DIM_KEY)
    layer.eval()
    with_adapters = layer.retrieve(x)
    kept = layer.query_adapters
    layer.query_adapters = nn.ModuleDict()
    without = layer.retrieve(x)
    layer.query_adapters = kept
    assert torch.equal(with_adapters[1], without[1])
    torch.testing.assert_close(with_adapters[0], without[0])
    old = layer(x, owners=0)
    with torch.no_grad():
        layer.query_adapters["1"].up.normal_()
    assert torch.equal(layer(x, owners=0), old)
    assert not torch.equal(layer.retrieve(x, owners=1)[0], without[0])


def test_freezing_keys_freezes_the_owners_adapter_also_after_loading():
    layer, _ = layer_with_old_owner(query_adapter_rank=2, query_adapter_affine=True)
    assert not any(p.requires_grad for p in layer.query_adapters["0"].parameters())
    assert all(p.requires_grad for p in layer.query_adapters["1"].parameters())
    fresh = PEER(HEADS * DIM_KEY, num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY,
                 query_norm=None, query_adapter_rank=2, query_adapter_affine=True)
    fresh.load_state_dict(layer.state_dict())
    assert sorted(fresh.query_adapters) == ["0", "1"]
    assert not fresh.query_adapters["0"].scale.requires_grad
    assert fresh.query_adapters["1"].scale.requires_grad
    assert torch.equal(fresh.query_adapters["0"].down, layer.query_adapters["0"].down)
    plain = PEER(HEADS * DIM_KEY, num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY,
                 query_norm=None)
    with pytest.raises(ValueError, match="query adapters"):
        plain.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("adapters", [0, 2])
def test_owner_restricted_old_outputs_stay_bit_identical_while_a_new_owner_trains(adapters):
    layer = PEER(12, dim_out=5, num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY,
                 query_norm="batch", query_adapter_rank=adapters,
                 query_adapter_affine=bool(adapters), capacity=40, key_capacity=12)
    head = nn.Linear(5, 3)
    params = [*layer.parameters(), *head.parameters()]
    x0, y0 = torch.randn(64, 12), torch.randint(0, 3, (64,))
    x1, y1 = torch.randn(64, 12) + 1.0, torch.randint(0, 3, (64,))
    opt = make_optimizer(nn.ModuleList([layer, head]), lr=1e-2)
    for _ in range(5):  # owner 0 trains everything
        opt.zero_grad()
        nn.functional.cross_entropy(head(layer(x0)), y0).backward()
        opt.step()
    layer.eval()
    old = layer(x0, owners=0)
    layer.train()
    layer.freeze(0, query=True)
    layer.grow(4, owner=1)  # within capacity: no Parameter is replaced
    new_params = [p for p in layer.parameters() if all(p is not q for q in params)]
    if new_params:
        opt.add_param_group({"params": new_params})
    keys_before = layer.sub_keys.detach().clone()
    for _ in range(5):  # owner 1 trains its experts, keys and adapter, unrestricted
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(layer(x1)), y1)
        loss = loss + key_margin_loss(layer, new_owner=1, num_samples=32)
        loss.backward()
        opt.step()
    assert not torch.equal(layer.sub_keys.detach()[4:8], keys_before[4:8])  # new keys moved
    assert layer.query_stats.count_of(1) == 5 * 64
    layer.eval()
    assert torch.equal(layer(x0, owners=0), old)
