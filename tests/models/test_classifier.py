"""PEERClassifier: plain torch, owners as an argument, heads, pickling, argument checks."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from peer_ll.models import PEERClassifier
from peer_ll.models.classifier import PEER_DEFAULTS

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _model(**kwargs):
    return PEERClassifier(64, 5, hidden=16, peer=SMALL, **kwargs)


def test_forward_shapes_and_flattening():
    model = _model(blocks=2)
    assert model(torch.randn(7, 64)).shape == (7, 5)
    assert model(torch.randn(7, 1, 8, 8)).shape == (7, 5)
    assert len(model.peer_layers) == 2 and all(p.dim == 16 for p in model.peer_layers)
    assert isinstance(model.head, nn.Linear)


def test_a_plain_model_has_no_growth_and_no_owner_state():
    model = _model()
    layer = model.peer_layers[0]
    assert "growth" not in layer._modules and layer.query_adapter is None
    names = set(model.state_dict())
    assert not any("stats" in n or "adapter" in n for n in names), names


def test_owners_reach_every_peer_layer():
    model = _model(blocks=2)
    for layer in model.peer_layers:
        layer.grow(4, owner=1)
    model.eval()
    x = torch.randn(6, 64)
    per_input = torch.tensor([0, 1, 0, 1, 1, 0])
    mixed = model(x, owners=per_input)
    torch.testing.assert_close(mixed[per_input == 0], model(x, owners=0)[per_input == 0])
    torch.testing.assert_close(mixed[per_input == 1], model(x, owners=[1])[per_input == 1])
    assert not torch.allclose(model(x, owners=0), model(x, owners=1))
    with pytest.raises(ValueError, match=r"owners must be among \[0, 1\], got \[2\]"):
        model(x, owners=2)


class _OwnerHead(nn.Module):
    takes_owners = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, owners=None):
        self.seen.append(owners)
        return x[:, :3]


def test_an_owner_aware_head_gets_the_owners_and_a_plain_head_does_not():
    head = _OwnerHead()
    model = _model(head=head)
    assert model(torch.randn(2, 64), owners=0).shape == (2, 3)
    assert head.seen == [0]
    plain = _model(head=nn.Linear(16, 2))
    assert plain(torch.randn(2, 64), owners=0).shape == (2, 2)


def test_pickle_and_deepcopy_keep_the_class_and_weights():
    model = _model().eval()
    x = torch.randn(3, 64)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_peer_defaults_and_overrides():
    model = PEERClassifier(64, 3, hidden=32, peer={"num_keys": 5})
    layer = model.peer_layers[0]
    assert layer.num_experts == 25 and layer.sparse_grad
    assert layer.heads == PEER_DEFAULTS["heads"] and layer.query_norm_kind == "layer"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(head="incremental"), TypeError, "peer_ll.strategies.peer_classifier"),
        (dict(head=3), TypeError, "head must be a Module, got int"),
        (dict(hidden=0), ValueError, "hidden must be an int >= 1, got 0"),
        (dict(blocks=1.5), TypeError, "blocks must be an int >= 1, got float 1.5"),
        (dict(peer=[("num_keys", 4)]), TypeError, "peer must be a Mapping, got list"),
        (dict(peer={"dim": 8}), ValueError, "peer must not set dim"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(hidden=16, peer=SMALL) | kwargs
    with pytest.raises(error, match=message):
        PEERClassifier(64, 5, **args)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="64 values per sample"):
        _model()(torch.randn(3, 63))


def test_building_and_running_a_classifier_does_not_import_avalanche():
    code = (
        "import sys, torch; from peer_ll.models import PEERClassifier;"
        "m = PEERClassifier(8, 2, hidden=8, peer=dict(num_keys=2, heads=1, topk=2, dim_key=4));"
        "m(torch.randn(2, 8)); assert 'avalanche' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
