"""Owner inference: well-separated owners are inferred right; hard, soft and the switch."""

import pytest
import torch
from torch import nn

from peer_ll.experts import (
    PEER,
    OwnerInference,
    inferred_owners,
    owner_posterior,
    set_owner_inference,
)

HEADS, DIM_KEY = 2, 8
DIM = HEADS * DIM_KEY


def separated_layer() -> tuple[PEER, torch.Tensor]:
    """Owners 0 and 1 with opposite query clusters and keys that match their own cluster.

    The query network is the identity, so input x is the query (2 heads of 8).
    Returns the layer and the two cluster directions (2, H, d).
    """
    layer = PEER(DIM, num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY, query_norm=None)
    layer.grow(4, owner=1)
    with torch.no_grad():
        layer.to_query.weight.copy_(torch.eye(DIM))
    centres = torch.randn(HEADS, DIM_KEY)
    centres = torch.stack([centres, -centres]) * 2  # (2, H, d)
    half = DIM_KEY // 2
    for owner in (0, 1):
        off = int(layer.segments[owner, 0])
        # every sub-key of owner o points along its centre's halves (head 0), plus noise
        with torch.no_grad():
            layer.sub_keys[off:off + 4, 0] = centres[owner, 0, :half] + 0.1 * torch.randn(4, half)
            layer.sub_keys[off:off + 4, 1] = centres[owner, 0, half:] + 0.1 * torch.randn(4, half)
        layer.training_owner = owner
        layer(cluster(centres, owner, 64))  # training-mode forward: records statistics
    layer.eval()
    return layer, centres


def cluster(centres: torch.Tensor, owner: int, n: int) -> torch.Tensor:
    return (centres[owner] + 0.3 * torch.randn(n, HEADS, DIM_KEY)).reshape(n, DIM)


def mixed_batch(centres):
    truth = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1])
    x = torch.stack([cluster(centres, int(o), 1)[0] for o in truth])
    return x, truth


@pytest.mark.parametrize("method", ["likelihood", "margin", "soft"])
def test_well_separated_owners_are_inferred_right(method):
    layer, centres = separated_layer()
    set_owner_inference(layer, method)
    x, truth = mixed_batch(centres)
    got = inferred_owners(layer, x)[""]
    assert torch.equal(got, truth)
    # inference restricts retrieval: the same output as with the true owners given
    torch.testing.assert_close(layer(x), layer(x, owners=truth))
    assert not layer.training  # inferred_owners restored the eval mode


def test_posterior_is_confident_for_separated_owners_and_sums_to_one():
    layer, centres = separated_layer()
    set_owner_inference(layer, "likelihood", temperature=1.0)
    x, truth = mixed_batch(centres)
    owners, post = owner_posterior(layer, x.view(1, -1, DIM))
    assert owners == [0, 1] and post.shape == (1, len(truth), 2)
    torch.testing.assert_close(post.sum(-1), torch.ones(1, len(truth)))
    assert bool((post[0, torch.arange(len(truth)), truth] > 0.99).all())


class HalfHalf(OwnerInference):
    """Mixes owners 0 and 1 with weight 1/2 each, whatever the input."""

    def mixture(self, layer, x, q):
        t = q.shape[0]
        return torch.tensor([[0, 1]]).expand(t, 2), torch.full((t, 2), 0.5)


def test_soft_mixing_averages_owner_restricted_outputs_by_weight():
    layer, centres = separated_layer()
    set_owner_inference(layer, HalfHalf("soft"))
    x, _ = mixed_batch(centres)
    want = 0.5 * layer(x, owners=0) + 0.5 * layer(x, owners=1)
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer(x, owners="infer"), want)


def test_switch_applies_to_eval_forwards_only_and_turns_off():
    layer, centres = separated_layer()
    x, truth = mixed_batch(centres)
    everything = layer(x)
    set_owner_inference(layer, "likelihood")
    inferred = layer(x)
    assert torch.equal(inferred, layer(x, owners=truth))
    assert not torch.equal(inferred, everything)  # opposite clusters: all-owner mixes differ
    assert torch.equal(layer(x, owners="all"), everything)
    layer.train()
    layer.training_owner = None
    assert torch.equal(layer(x), everything)  # training forwards search every owner
    layer.eval()
    set_owner_inference(layer, None)
    assert layer.owner_inference is None and torch.equal(layer(x), everything)


def test_inferred_owners_reports_every_peer_layer_of_a_model():
    layer, centres = separated_layer()
    model = nn.Sequential(nn.Identity(), layer, nn.Linear(DIM, 3))
    model.train()
    layers = set_owner_inference(model, "margin", key_score="gap")
    assert list(layers) == ["1"]
    x, _ = mixed_batch(centres)
    got = inferred_owners(model, x)
    assert set(got) == {"1"} and got["1"].shape == (len(x),)
    assert model.training and layer.training  # modes restored


def test_errors_name_the_problem():
    layer = PEER(DIM, num_keys=4, heads=HEADS, topk=3, dim_key=DIM_KEY, query_norm=None)
    layer.eval()
    x = torch.randn(3, DIM)
    with pytest.raises(ValueError, match="no owner can be inferred"):
        layer(x, owners="infer")  # the default likelihood, no statistics recorded yet
    set_owner_inference(layer, "likelihood")
    with pytest.raises(ValueError, match="no owner can be inferred"):
        layer(x)  # no statistics recorded yet
    with pytest.raises(ValueError, match="method must be one of"):
        set_owner_inference(layer, "oracle")
    with pytest.raises(ValueError, match="must contain PEER layers"):
        set_owner_inference(nn.Linear(2, 2), "margin")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        OwnerInference("soft", temperature=0.0)


def test_infer_without_a_switch_uses_the_query_likelihood():
    layer, centres = separated_layer()
    x, truth = mixed_batch(centres)
    assert layer.owner_inference is None
    want = layer(x, owners=truth)
    got = layer(x, owners="infer")  # no set_owner_inference: the likelihood by default
    assert torch.equal(layer.last_inferred_owners, truth)
    torch.testing.assert_close(got, want)
    bare = PEER(DIM, num_keys=2, heads=HEADS, topk=2, dim_key=DIM_KEY, query_stats=None)
    with pytest.raises(ValueError, match='owners="infer" needs per-owner query statistics'):
        bare(x, owners="infer")
    with pytest.raises(ValueError, match="owners must be None, \"all\", \"infer\""):
        bare(x, owners="guess")
