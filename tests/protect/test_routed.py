"""Owners travel as arguments: OwnerRouted decides them per forward and stores nothing."""

import pytest
import torch
from torch import nn

from peer_ll.experts import OwnerMix, mix_owners
from peer_ll.models import PEERClassifier
from peer_ll.protect import InputOwnerStats, OwnerRouted, with_owner_head, with_query_adapters

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def two_owner_model() -> nn.Module:
    """A classifier over owners 0 and 1 (own experts, head and query adapter each)."""
    model = with_owner_head(with_query_adapters(PEERClassifier(8, 3, hidden=16, peer=SMALL)))
    model.blocks[0].peer.grow(4, owner=1)
    for per_owner in (model.head, model.blocks[0].peer.query_adapter):
        per_owner.add_owner(1)
        with torch.no_grad():
            for p in per_owner.copies["1"].parameters():
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def clusters(n: int = 30) -> dict[int, torch.Tensor]:
    return {0: torch.randn(n, 8) - 3, 1: torch.randn(n, 8) + 3}


def fitted(model: nn.Module) -> InputOwnerStats:
    stats = InputOwnerStats(rank=2, per_class=False)
    for owner, x in clusters().items():
        stats.fit(model, owner, x)
    return stats


def test_interleaved_forwards_give_what_each_gives_alone():
    model = two_owner_model()
    x = torch.randn(5, 8)
    with torch.no_grad():
        alone0 = model(x, owners=0).clone()
        alone1 = model(x, owners=1).clone()
        per_input = torch.tensor([0, 1, 1, 0, 1])
        mixed = model(x, owners=per_input)
        again0, again1 = model(x, owners=0), model(x, owners=1)
    assert not torch.equal(alone0, alone1)
    assert torch.equal(again0, alone0) and torch.equal(again1, alone1)
    torch.testing.assert_close(mixed[per_input == 0], alone0[per_input == 0])
    torch.testing.assert_close(mixed[per_input == 1], alone1[per_input == 1])


def test_a_forward_leaves_no_routing_state_behind():
    model = two_owner_model()
    routed = OwnerRouted(model, fitted(model)).eval()
    before = {name: dict(vars(m)) for name, m in routed.named_modules()}
    with torch.no_grad():
        routed(torch.randn(4, 8), owners=1)
        routed(torch.randn(4, 8))
    after = {name: dict(vars(m)) for name, m in routed.named_modules()}
    assert before.keys() == after.keys()
    for name in before:  # same attributes, and no plain attribute changed value
        assert before[name].keys() == after[name].keys(), name
        plain = [
            k for k, v in before[name].items() if not isinstance(v, dict) and not k.startswith("_")
        ]
        assert all(
            after[name][k] is before[name][k] or after[name][k] == before[name][k] for k in plain
        ), name


def test_route_follows_the_standing_owner_then_the_scorer():
    model = two_owner_model()
    routed = OwnerRouted(model, fitted(model))
    x = torch.cat([clusters(4)[0], clusters(4)[1]])
    truth = torch.tensor([0] * 4 + [1] * 4)
    routed.train()
    assert routed.route(x) is None  # training without a standing owner: every expert
    routed.set_owner(1)
    assert routed.route(x) == 1
    routed.eval()
    assert routed.route(x) == 1  # the standing owner holds in any mode
    with torch.no_grad():
        torch.testing.assert_close(routed(x), model(x, owners=1))
    routed.set_owner(None)
    assert torch.equal(routed.route(x), truth)
    with torch.no_grad():
        torch.testing.assert_close(routed(x), model(x, owners=truth))
        torch.testing.assert_close(routed(x, owners=0), model(x, owners=0))  # explicit wins
    unfit = OwnerRouted(model, InputOwnerStats()).eval()
    assert unfit.route(x) is None  # a scorer with no owners yet: every expert


def test_soft_routing_mixes_class_probabilities_with_mix_owners():
    model = two_owner_model()
    routed = OwnerRouted(model, fitted(model), soft=True, top=2, temperature=50.0).eval()
    x = torch.randn(6, 8)
    route = routed.route(x)
    assert isinstance(route, OwnerMix) and route.ids.shape == (6, 2)
    torch.testing.assert_close(route.weights.sum(1), torch.ones(6))
    with torch.no_grad():
        out = routed(x)
        want = mix_owners(lambda o: model(x, owners=o).softmax(-1), route).log()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6))  # log-probabilities
    one = OwnerRouted(model, fitted(model), soft=True, top=1).eval()
    with torch.no_grad():  # one owner mixed: the hard route's class log-probabilities
        torch.testing.assert_close(
            one(x), model(x, owners=one.route(x).ids[:, 0]).log_softmax(-1), atol=1e-5, rtol=1e-5
        )


def test_bad_arguments_raise_and_name_them():
    model = two_owner_model()
    with pytest.raises(TypeError, match="model must be owner-aware"):
        OwnerRouted(nn.Linear(8, 3))
    with pytest.raises(TypeError, match=r"scorer must have a scores\(\) method"):
        OwnerRouted(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        OwnerRouted(model, top=0)
    with pytest.raises(ValueError, match="temperature must be a float"):
        OwnerRouted(model, temperature=0.0)
    routed = OwnerRouted(model)
    with pytest.raises(ValueError, match="owner must be an int >= 0"):
        routed.set_owner(-1)
    assert routed.owner is None
