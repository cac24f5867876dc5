"""Owners as explicit data: the owners argument, mix_owners, call_with_owners, metrics."""

import pytest
import torch
from torch import nn

from peer_ll.experts import (
    PEER,
    OwnerMix,
    PerOwner,
    QueryAdapter,
    call_with_owners,
    mix_owners,
    peer_layers,
    unevenness,
)


def grown(**kw):
    layer = PEER(12, num_keys=4, heads=2, topk=4, dim_key=8, **kw)
    layer.grow(3, owner=1)
    layer.grow(2, owner=5)
    return layer


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()} | {
        "mass": layer.expert_mass.clone()
    }


@pytest.mark.parametrize(
    "owners, error, message",
    [
        ("infer", TypeError, "owners must be None, an int, a sequence of ints or an integer"),
        (1.5, TypeError, "owners must be None, an int"),
        ([0, "a"], TypeError, "owners must be an int >= 0, got str 'a'"),
        ([], ValueError, r"owners must be among \[0, 1, 5, 6\], got \[\]"),
        ([0, 2], ValueError, r"owners must be among \[0, 1, 5, 6\], got \[0, 2\]"),
        (torch.zeros(6), TypeError, "owners must be an integer tensor, got torch.float32"),
        (torch.zeros(5, dtype=torch.long), ValueError, r"owners must have shape \(6,\)"),
        (torch.full((6,), 3), ValueError, r"got \[3\]"),
        (6, ValueError, "owners must hold at least topk=4 experts, got owners 6 holding 1"),
    ],
)
def test_bad_owners_raise_before_anything_changes(owners, error, message):
    layer = grown()  # training mode: a good forward would move BatchNorm's statistics
    layer.grow(1, owner=6)  # owner 6 holds 1 expert < topk
    before = _state(layer)
    x = torch.randn(6, 12)
    for call in (lambda: layer(x, owners=owners), lambda: layer.retrieve(x, owners)):
        with pytest.raises(error, match=message):
            call()
        after = _state(layer)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_int_sequence_and_per_input_owners_agree():
    layer = grown().eval()
    x = torch.randn(6, 12)
    torch.testing.assert_close(layer(x, owners=1), layer(x, owners=[1]))
    torch.testing.assert_close(layer(x, owners=torch.tensor(1)), layer(x, owners=(1,)))
    per = torch.tensor([0, 1, 5, 1, 0, 5])
    got = layer(x, owners=per)
    for o in (0, 1, 5):
        torch.testing.assert_close(got[per == o], layer(x[per == o], owners=o))
    _, ids = layer.retrieve(x, per)
    assert bool((layer.owners[ids] == per[:, None, None]).all())


def test_a_batch_of_one_with_batchnorm_queries_in_training_says_what_to_do():
    layer = grown()
    before = _state(layer)
    with pytest.raises(ValueError, match=r"larger batch .*query_norm='layer'"):
        layer(torch.randn(1, 12))
    assert all(torch.equal(before[k], v) for k, v in _state(layer).items())
    layer.freeze([], keys=False, query=True)  # frozen queries use running statistics
    assert layer(torch.randn(1, 12)).shape == (1, 12)


def test_mix_owners_is_the_weighted_sum_of_routes():
    layer = grown().eval()
    x = torch.randn(4, 12)
    ids = torch.tensor([[0, 1], [1, 5], [5, 0], [0, 1]])
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    got = mix_owners(lambda o: layer(x, owners=o), OwnerMix(ids, w))
    want = torch.stack(
        [
            sum(w[b, m] * layer(x[b : b + 1], owners=int(ids[b, m]))[0] for m in range(2))
            for b in range(4)
        ]
    )
    torch.testing.assert_close(got, want)
    # weights that vary over a trailing axis, e.g. positions: (B, M, T) with outputs (B, T, E)
    w3 = torch.rand(4, 2, 3).softmax(1)
    xs = torch.randn(4, 3, 12)
    got = mix_owners(lambda o: layer(xs, owners=o[:, None].expand(4, 3)), OwnerMix(ids, w3))
    want = sum(w3[:, m, :, None] * layer(xs, owners=ids[:, m, None].expand(4, 3)) for m in range(2))
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="mix must be an OwnerMix, got tuple"):
        mix_owners(lambda o: o, (ids, w))
    with pytest.raises(ValueError, match="mix.weights must be a float tensor"):
        mix_owners(lambda o: o, OwnerMix(ids, w[:, :1]))
    with pytest.raises(ValueError, match="mix.weights must sum to 1 over M"):
        mix_owners(lambda o: o, OwnerMix(ids, w * 2))


def test_call_with_owners_only_passes_owners_to_owner_aware_modules():
    layer = grown().eval()
    x = torch.randn(3, 12)
    torch.testing.assert_close(call_with_owners(layer, x, 1), layer(x, owners=1))
    linear = nn.Linear(12, 2)
    torch.testing.assert_close(call_with_owners(linear, x, 1), linear(x))
    assert PEER.takes_owners and not getattr(nn.Linear, "takes_owners", False)


def test_peer_layers_lists_every_layer_or_says_there_is_none():
    model = nn.Sequential(nn.Linear(12, 12), grown(), nn.Sequential(grown()))
    assert list(peer_layers(model)) == ["1", "2.0"]
    with pytest.raises(ValueError, match="model must contain PEER layers, got a Linear"):
        peer_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a Module, got int"):
        peer_layers(3)


def test_unevenness_of_no_mass_raises():
    with pytest.raises(ValueError, match="mass must have a positive sum"):
        unevenness(torch.zeros(4))
    layer = grown()
    with pytest.raises(ValueError, match="mass must have a positive sum"):
        layer.routing_stats()


def test_the_paper_layer_has_no_owner_machinery():
    layer = grown()
    assert layer.query_adapter is None
    assert not any("adapter" in k or "stats" in k for k in layer.state_dict())
    for name in (
        "eval_owners",
        "training_owner",
        "recording_owner",
        "owner_inference",
        "last_inferred_owners",
        "query_stats",
    ):
        assert not hasattr(layer, name), name


def query_adapters(owners, *, rank=2, affine=True):
    """One identity-at-init QueryAdapter per owner (heads 2, dim_key 8), unknown: identity."""

    def new():
        return QueryAdapter(2, 8, rank=rank, affine=affine)

    adapters = PerOwner(new(), owner=owners[0], new=new, unknown="identity")
    for owner in owners[1:]:
        adapters.add_owner(owner)
    return adapters


def test_query_adapter_is_the_identity_until_trained_and_scores_only_its_owner():
    layer = grown().eval()
    x = torch.randn(8, 12)
    before = {o: layer(x, owners=o) for o in (None, 0, 1)}
    adapters = query_adapters([0, 1])
    layer.attach_query_adapter(adapters)
    for o, out in before.items():
        torch.testing.assert_close(layer(x, owners=o), out)
    with torch.no_grad():
        adapters.copies["1"].shift.fill_(3.0)
    torch.testing.assert_close(layer(x, owners=0), before[0])  # owner 0 untouched
    assert not torch.allclose(layer(x, owners=1), before[1])
    with pytest.raises(ValueError, match="query_adapter must be unset"):
        layer.attach_query_adapter(query_adapters([0]))


def test_freezing_an_owners_keys_freezes_its_adapter():
    layer = grown()
    adapters = query_adapters([0, 1, 5], affine=False)
    layer.attach_query_adapter(adapters)
    layer.freeze([0, 1])
    assert [adapters.copies[o].up.requires_grad for o in ("0", "1", "5")] == [False, False, True]
    layer.unfreeze(1)
    assert adapters.copies["1"].up.requires_grad
