"""peer_classifier: Avalanche heads and growth attached in one call."""

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from avalanche.models.dynamic_modules import avalanche_model_adaptation

from peer_ll.models import PEERClassifier
from peer_ll.strategies import GrowthPolicy, peer_classifier

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _model(**kwargs):
    return peer_classifier(64, 5, hidden=16, peer=SMALL, **kwargs)


def test_heads():
    assert isinstance(_model().head, IncrementalClassifier)
    assert isinstance(_model(head="fixed").head, torch.nn.Linear)
    multi = _model(head="multihead")
    assert isinstance(multi, PEERClassifier) and isinstance(multi, MultiTaskModule)
    assert isinstance(multi.head, MultiHeadClassifier)
    assert multi(torch.randn(4, 64), torch.zeros(4, dtype=torch.long)).shape == (4, 5)
    assert multi(torch.randn(4, 64), 0).shape == (4, 5)
    assert not isinstance(_model(), MultiTaskModule)


@pytest.mark.parametrize("head", ["incremental", "multihead", "fixed"])
def test_pickle_and_deepcopy_keep_the_class_weights_and_growth(head):
    model = _model(head=head).eval()
    x = torch.randn(3, 64)
    args = (x, 0) if head == "multihead" else (x,)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model)
        torch.testing.assert_close(clone(*args), model(*args), rtol=0, atol=0)
        assert clone.peer_layers[0].growth.layer is clone.peer_layers[0]


def test_growth_is_attached_with_the_given_policy():
    assert _model().peer_layers[0].growth.policy == GrowthPolicy()
    fixed = _model(growth=GrowthPolicy(when="never"))
    assert fixed.peer_layers[0].growth.policy.when == "never"


def test_incremental_head_and_pool_grow_with_new_classes():
    model = _model(growth=GrowthPolicy(max_experts=32))
    exp = SimpleNamespace(current_experience=1, classes_in_this_experience=[7], task_labels=[0])
    avalanche_model_adaptation(model, exp)
    assert model(torch.randn(2, 64)).shape == (2, 8)
    assert model.peer_layers[0].num_segments == 2  # the pool grew for experience 1


def test_bad_head():
    with pytest.raises(ValueError, match="head must be one of"):
        _model(head="many")
