"""PEERClassifier(growth="pool"): one retrieval over every expert, owners refused."""

import pytest
import torch

from peer_ll.models import PEERClassifier
from peer_ll.strategies import peer_classifier


def test_pool_growth_refuses_owners_and_changes_nothing(small_peer):
    model = PEERClassifier(12, 3, hidden=8, peer=small_peer, growth="pool")
    x = torch.randn(5, 12)
    before = model(x)
    with pytest.raises(ValueError, match="owners must be None for a model with growth='pool'"):
        model(x, owners=0)
    assert torch.equal(model(x), before)
    assert PEERClassifier(12, 3, hidden=8, peer=small_peer).growth == "owner"


def test_growth_must_be_a_known_mode(small_peer):
    with pytest.raises(
        ValueError, match=r"growth must be one of \('owner', 'pool'\), got 'branch'"
    ):
        PEERClassifier(12, 3, peer=small_peer, growth="branch")


def test_factory_takes_the_mode_with_the_default_policy(small_peer):
    model = peer_classifier(12, 3, hidden=8, peer=small_peer, head="fixed", growth="pool")
    assert model.growth == "pool"
    assert model.blocks[0].peer.growth.policy.when == "always"
    with pytest.raises(ValueError, match="growth must be one of"):
        peer_classifier(12, 3, peer=small_peer, growth="pools")
