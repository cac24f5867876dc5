"""OwnerCopies / with_owner_norms: per-owner normalisation parameters and statistics."""

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.models import PEERClassifier
from peer_ll.models.owner_copies import OwnerCopies, with_owner_norms


def _bn_copies():
    layer = PEER(4, num_keys=2, heads=1, topk=2, dim_key=4)
    copies = OwnerCopies(nn.BatchNorm1d(4), follow=layer)
    copies.add_owner(1)
    copies.freeze([0])
    return copies, layer


def test_each_owner_keeps_its_own_running_statistics():
    copies, _ = _bn_copies()
    before0 = copies.copies["0"].running_mean.clone()
    copies.train()
    copies.training_owner = 1
    copies(torch.randn(16, 4) + 3.0)
    assert torch.equal(copies.copies["0"].running_mean, before0)  # frozen owner: still
    assert (copies.copies["1"].running_mean > 0.1).all()  # training owner: updated
    assert copies.copies["1"].weight.requires_grad and not copies.copies["0"].weight.requires_grad


def test_eval_picks_a_copy_per_sample_from_the_followed_layer():
    copies, layer = _bn_copies()
    with torch.no_grad():
        copies.copies["1"].running_mean.fill_(2.0)
    copies.eval()
    x = torch.randn(6, 4)
    layer.eval_owners = torch.tensor([0, 1, 0, 1, 1, 0])
    out = copies(x)
    pick = layer.eval_owners == 1
    torch.testing.assert_close(out[pick], copies.copies["1"](x[pick]))
    torch.testing.assert_close(out[~pick], copies.copies["0"](x[~pick]))
    layer.eval_owners = 0
    torch.testing.assert_close(copies(x), copies.copies["0"](x))
    layer.eval_owners = "infer"
    with pytest.raises(ValueError, match="need each input's owner before the forward"):
        copies(x)
    with pytest.raises(ValueError, match=r"owners: expected owners among \[0, 1\], got 5"):
        copies(x, owners=5)
    with pytest.raises(ValueError, match=r"owners: expected shape \(6,\)"):
        copies(x, owners=torch.tensor([0, 1]))


def test_state_dict_round_trip_creates_the_copies():
    copies, _ = _bn_copies()
    with torch.no_grad():
        copies.copies["1"].weight.fill_(3.0)
    fresh = OwnerCopies(nn.BatchNorm1d(4))
    fresh.load_state_dict(copies.state_dict())
    assert fresh.owners == [0, 1]
    assert torch.equal(fresh.copies["1"].weight, torch.full((4,), 3.0))


def test_with_owner_norms_wraps_the_trunk_norms_only():
    model = PEERClassifier(64, 10, hidden=16, head="fixed", peer=dict(num_keys=4, heads=2,
                                                                     topk=4, dim_key=16))
    with_owner_norms(model)
    assert isinstance(model.blocks[0].norm, OwnerCopies) and isinstance(model.norm, OwnerCopies)
    assert not any(isinstance(m, OwnerCopies) for m in model.peer_layers[0].modules())
    with pytest.raises(ValueError, match="expected normalisation layers outside"):
        with_owner_norms(nn.Sequential(PEER(8, num_keys=2, heads=1, topk=2, dim_key=4)))
