"""PerOwner: one copy per owner, picked by the owners argument; the builders."""

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER, QueryAdapter
from peer_ll.models import PEERClassifier
from peer_ll.protect import (
    MASKED_LOGIT,
    PerOwner,
    with_owner_encoder,
    with_owner_head,
    with_owner_norms,
    with_query_adapters,
)

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _head(**kw) -> PerOwner:
    return PerOwner(nn.Linear(6, 4), num_classes=4, **kw)


def test_each_owner_has_its_copy_and_class_mask():
    head = _head()
    head.add_owner(1, classes=[2, 3])
    h = torch.randn(5, 6)
    torch.testing.assert_close(head(h, owners=1)[:, 2:], head.copies["1"](h)[:, 2:])
    assert bool((head(h, owners=1)[:, :2] == MASKED_LOGIT).all())
    owners = torch.tensor([0, 1, 1, 0, 1])
    mixed = head(h, owners=owners)
    torch.testing.assert_close(mixed[owners == 0], head(h[owners == 0], owners=0))
    torch.testing.assert_close(mixed[owners == 1], head(h[owners == 1], owners=1))
    torch.testing.assert_close(head(h), head(h, owners=1))  # no owners: the newest


def test_owners_of_leading_axes_pick_per_position():
    per = PerOwner(nn.Linear(3, 2))
    per.add_owner(5)
    x = torch.randn(2, 4, 3)
    owners = torch.tensor([[0, 5, 5, 0], [5, 0, 0, 5]])
    out = per(x, owners=owners)
    assert out.shape == (2, 4, 2)
    torch.testing.assert_close(out[owners == 5], per.copies["5"](x[owners == 5]))


def test_new_copies_copy_the_newest_or_start_fresh():
    head = _head()
    new = head.add_owner(3)
    assert torch.equal(new.weight, head.copies["0"].weight)
    assert new.weight is not head.copies["0"].weight

    def fresh():
        return QueryAdapter(2, 4, rank=2, affine=True)

    adapters = PerOwner(fresh(), new=fresh, unknown="identity")
    with torch.no_grad():
        adapters.copies["0"].shift.fill_(1.0)
    assert bool((adapters.add_owner(1).shift == 0).all())  # fresh: the identity again
    q = torch.randn(3, 2, 4)
    assert torch.equal(adapters(q, 1), q) and torch.equal(adapters(q, 9), q)  # 9: unknown


def test_freezing_also_holds_batchnorm_statistics_still():
    norms = PerOwner(nn.BatchNorm1d(4))
    norms.add_owner(1)
    norms.freeze([0])
    before = norms.copies["0"].running_mean.clone()
    norms.train()
    norms(torch.randn(16, 4) + 3.0, owners=0)
    norms(torch.randn(16, 4) + 3.0, owners=1)
    assert torch.equal(norms.copies["0"].running_mean, before)  # frozen owner: still
    assert (norms.copies["1"].running_mean > 0.1).all()  # training owner: updated
    assert norms.copies["1"].weight.requires_grad and not norms.copies["0"].weight.requires_grad
    with pytest.raises(ValueError, match=r"owners must be among \[0, 1\], got \[7\]"):
        norms.freeze([7])


def test_bad_owners_raise_and_name_the_argument():
    head = _head()
    h = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"owners must be among \[0\] \(owners with a copy\)"):
        head(h, owners=2)
    with pytest.raises(ValueError, match=r"owners must have shape \(5,\)"):
        head(h, owners=torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="owners must be an integer tensor"):
        head(h, owners=torch.zeros(5))
    with pytest.raises(ValueError, match="classes must be a non-empty set"):
        head.add_owner(1, classes=[4])
    assert head.owners == [0]  # a failing call changes nothing
    with pytest.raises(ValueError, match="unknown must be one of"):
        PerOwner(nn.Linear(2, 2), unknown="zeros")
    with pytest.raises(TypeError, match="new must be a callable or None"):
        PerOwner(nn.Linear(2, 2), new=nn.Linear(2, 2).weight)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        PerOwner(lambda x: x)


def test_state_dict_round_trip_creates_the_copies():
    head = _head()
    head.add_owner(4, classes=[1])
    with torch.no_grad():
        head.copies["4"].weight.fill_(3.0)
    fresh = _head()
    fresh.load_state_dict(head.state_dict())
    assert fresh.owners == [0, 4]
    assert torch.equal(fresh.copies["4"].weight, torch.full((4, 6), 3.0))
    assert torch.equal(fresh.class_mask, head.class_mask)


def test_builders_install_per_owner_modules():
    model = PEERClassifier(64, 10, hidden=16, peer=SMALL)
    old = model.head.weight.detach().clone()
    with_owner_head(with_owner_encoder(with_owner_norms(with_query_adapters(model))))
    assert isinstance(model.head, PerOwner) and model.head.num_classes == 10
    assert torch.equal(model.head.copies["0"].weight, old)
    assert isinstance(model.encoder[1], PerOwner) and isinstance(model.norm, PerOwner)
    layer = model.blocks[0].peer
    assert isinstance(layer.query_adapter, PerOwner)
    assert not any(
        isinstance(m, PerOwner)
        for m in layer.modules()
        if m is not layer.query_adapter and m not in layer.query_adapter.modules()
    )
    x = torch.randn(3, 64)
    assert model(x, owners=0).shape == (3, 10)
    with pytest.raises(TypeError, match="model.head must be a torch.nn.Linear"):
        with_owner_head(model)
    with pytest.raises(ValueError, match="normalisation layers outside"):
        with_owner_norms(nn.Sequential(PEER(8, num_keys=2, heads=1, topk=2, dim_key=4)))
