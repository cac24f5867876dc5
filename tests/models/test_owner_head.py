"""OwnerHead: one head per owner, picked by explicit, training or routed owners."""

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER, set_owner_inference
from peer_ll.models import PEERClassifier
from peer_ll.models.owner_head import MASKED_LOGIT, OwnerHead, with_owner_head


def test_each_owner_has_its_head_and_class_mask():
    head = OwnerHead(6, 4)
    head.add_owner(1, classes=[2, 3])
    h = torch.randn(5, 6)
    torch.testing.assert_close(head(h, owners=1)[:, 2:], head.heads["1"](h)[:, 2:])
    assert bool((head(h, owners=1)[:, :2] == MASKED_LOGIT).all())
    owners = torch.tensor([0, 1, 1, 0, 1])
    mixed = head(h, owners=owners)
    torch.testing.assert_close(mixed[owners == 0], head(h[owners == 0], owners=0))
    torch.testing.assert_close(mixed[owners == 1], head(h[owners == 1], owners=1))


def test_new_heads_copy_the_newest_or_start_fresh():
    head = OwnerHead(6, 4, init="copy")
    new = head.add_owner(3)
    assert torch.equal(new.weight, head.heads["0"].weight)
    assert new.weight is not head.heads["0"].weight
    fresh = OwnerHead(6, 4, init="fresh")
    assert not torch.equal(fresh.add_owner(1).weight, fresh.heads["0"].weight)


def test_training_owner_and_freezing():
    head = OwnerHead(6, 4)
    head.add_owner(1)
    h = torch.randn(3, 6)
    head.train()
    torch.testing.assert_close(head(h), head(h, owners=1))  # newest by default
    head.training_owner = 0
    torch.testing.assert_close(head(h), head(h, owners=0))
    head.freeze([0])
    assert not head.heads["0"].weight.requires_grad and head.heads["1"].weight.requires_grad
    with pytest.raises(ValueError, match="owners must be among"):
        head.freeze([7])


def test_eval_follows_the_owners_the_layer_inferred():
    layer = PEER(8, num_keys=4, heads=2, topk=3, dim_key=4, query_norm=None)
    layer.grow(4, owner=1)
    layer(torch.randn(40, 8))  # statistics of owner 1 (the newest)
    layer.training_owner = 0
    layer(torch.randn(40, 8) + 3.0)
    head = OwnerHead(8, 3, follow=layer)
    head.add_owner(1)
    model = nn.Sequential(layer, head).eval()
    set_owner_inference(layer, "likelihood")
    x = torch.randn(6, 8)
    out = model(x)
    owners = layer.last_inferred_owners
    assert owners.shape == (6,)
    torch.testing.assert_close(out, head(layer(x, owners=owners), owners=owners))
    set_owner_inference(layer, None)
    layer.eval_owners = 0
    torch.testing.assert_close(model(x), head(layer(x, owners=0), owners=0))


def test_state_dict_round_trip_creates_the_heads():
    head = OwnerHead(6, 4)
    head.add_owner(2, classes=[1])
    other = OwnerHead(6, 4)
    other.load_state_dict(head.state_dict())
    assert other.owners == [0, 2]
    h = torch.randn(3, 6)
    torch.testing.assert_close(other(h, owners=2), head(h, owners=2))


def test_with_owner_head_keeps_the_first_head_and_checks_the_model():
    model = PEERClassifier(64, 5, hidden=16, head="fixed",
                           peer=dict(num_keys=4, heads=2, topk=4, dim_key=16))
    x = torch.randn(4, 64)
    before = model.eval()(x)
    with_owner_head(model)
    assert isinstance(model.head, OwnerHead) and model.head.follow is model.peer_layers[-1]
    assert not any(k.startswith("head.follow") for k in model.state_dict())  # not a submodule
    with pytest.raises(TypeError, match="follow must be a PEER layer"):
        model.head.follow = nn.Linear(2, 2)
    torch.testing.assert_close(model(x), before)
    with pytest.raises(TypeError, match="model.head must be a torch.nn.Linear"):
        with_owner_head(model)
    with pytest.raises(ValueError, match="classes must be a non-empty set"):
        model.head.add_owner(1, classes=[9])
