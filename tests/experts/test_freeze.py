"""Ownership and freezing: frozen rows change in no way while the rest trains."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer


def grown(*, sparse_grad=True):
    # capacity 64 leaves room for 16 sub-keys
    layer = PEER(16, num_keys=4, heads=2, topk=4, dim_key=8, capacity=64)
    layer.sparse_grad = sparse_grad
    layer.grow(4, owner=1)
    return layer


def train(layer, opt, steps=5, owners=None):
    x = torch.randn(48, 16)
    for _ in range(steps):
        opt.zero_grad()
        layer(x, owners=owners).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_frozen_rows_are_bit_identical_after_training_with_weight_decay(sparse_grad):
    layer = grown(sparse_grad=sparse_grad)
    opt = make_optimizer(layer, lr=1e-2, weight_decay=0.1)
    train(layer, opt, steps=3)  # owner 0's rows now have non-zero Adam moments
    layer.freeze(0)
    down0, up0 = (t[:16].clone() for t in layer.expert_weights())
    keys0 = layer.sub_keys[:4].detach().clone()
    m0 = opt.state[layer.down]["exp_avg"][:16].clone()
    train(layer, opt, steps=5)
    down, up = layer.expert_weights()
    assert torch.equal(down[:16], down0) and torch.equal(up[:16], up0)
    assert torch.equal(layer.sub_keys[:4].detach(), keys0)
    assert torch.equal(opt.state[layer.down]["exp_avg"][:16], m0)
    assert not torch.equal(down[16:32], down[16:32] * 0)  # owner 1 trained
    assert layer.frozen.tolist() == [True] * 16 + [False] * 16


def test_frozen_rows_get_no_gradient():
    layer = grown()
    layer.freeze(0)
    layer(torch.randn(30, 16)).square().sum().backward()
    rows = layer.down.grad.coalesce().indices()[0]
    assert rows.numel() > 0 and bool((rows >= 16).all())
    assert float(layer.sub_keys.grad[:4].abs().sum()) == 0.0
    assert float(layer.sub_keys.grad[4:8].abs().sum()) > 0.0


def test_stock_adamw_still_decays_frozen_rows():
    """Documented limitation: a stock optimizer does not know about frozen rows."""
    layer = grown(sparse_grad=False)
    layer.freeze(0)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.5)
    before = layer.down[:16].detach().clone()
    train(layer, opt, steps=2)
    assert not torch.equal(layer.down[:16].detach(), before)


def test_freeze_query_network_and_unfreeze():
    layer = grown()
    layer.freeze(query=True)
    assert not layer.to_query.weight.requires_grad
    layer.train()
    x = torch.randn(10, 16)
    # a frozen query network normalises with running statistics: no batch dependence
    torch.testing.assert_close(layer.query(x[:1]), layer.query(x)[:1])
    layer.unfreeze()
    assert layer.to_query.weight.requires_grad and not bool(layer.frozen.any())


def test_owner_restricted_outputs_unchanged_after_training_new_owner():
    layer = grown()
    layer.freeze(0, query=True)
    opt = make_optimizer(layer, lr=1e-2, weight_decay=0.1)
    x = torch.randn(20, 16)
    layer.eval()
    before = layer(x, owners=0)
    layer.train()
    train(layer, opt, steps=5)
    layer.eval()
    assert torch.equal(layer(x, owners=0), before)


def test_freeze_unknown_owner_is_an_error():
    layer = grown()
    with pytest.raises(ValueError, match=r"owners must be among \[0, 1\], got \[5\]"):
        layer.freeze(5)
