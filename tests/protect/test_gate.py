"""OwnerGate: fit on an owner's inputs and a replay, scores, state_dict; layer_input."""

import pytest
import torch
from torch import nn

from peer_ll.models import PEERClassifier
from peer_ll.protect import OwnerGate
from peer_ll.protect.routed import layer_input

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _model() -> PEERClassifier:
    return PEERClassifier(8, 3, hidden=16, peer=SMALL).eval()


def test_gate_fits_on_the_owner_and_the_replay_and_scores_owners():
    model = _model()
    a, b = torch.randn(60, 8) - 2, torch.randn(60, 8) + 2
    gate = OwnerGate(hidden=16, steps=80)
    with pytest.raises(ValueError, match="the gate must be fit before scoring"):
        gate.scores(model, a)
    assert gate.fit(model, 0, a) == 1.0 and gate.owners == [0]  # one owner: always right
    accuracy = gate.fit(model, 3, b, replay={0: a[:20], 3: b[:5]})  # 3's own inputs: x only
    assert gate.owners == [0, 3] and accuracy > 0.9
    owners, logp = gate.scores(model, torch.cat([a[20:30], b[20:30]]))
    assert owners == [0, 3]
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(20))
    assert torch.equal(logp.argmax(1), torch.tensor([0] * 10 + [1] * 10))
    assert not any(p.requires_grad for p in gate.parameters())
    fresh = OwnerGate(hidden=16)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.owners == [0, 3]
    assert torch.equal(fresh.scores(model, a[:5])[1], gate.scores(model, a[:5])[1])


def test_layer_input_stops_at_the_layer_and_leaves_no_hook():
    model = _model()
    x = torch.randn(4, 8)
    layer = model.blocks[0].peer
    got = layer_input(model, layer, x)
    torch.testing.assert_close(got, model.blocks[0].norm(model.encoder(x)))
    assert not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="layer must run in model's forward"):
        layer_input(nn.Identity(), layer, x)
    assert not layer._forward_pre_hooks
