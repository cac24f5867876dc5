"""PEERClassifier: heads, shapes, growth, pickling, argument checks."""

import copy
import pickle
import subprocess
import sys

import pytest
import torch

from peer_ll.models import PEERClassifier
from peer_ll.models.classifier import PEER_DEFAULTS

SMALL = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _model(**kwargs):
    return PEERClassifier(64, 5, hidden=16, peer=SMALL, **kwargs)


@pytest.mark.parametrize("head", ["incremental", "fixed"])
def test_forward_shapes_and_flattening(head):
    model = _model(head=head, blocks=2)
    assert model(torch.randn(7, 64)).shape == (7, 5)
    assert model(torch.randn(7, 1, 8, 8)).shape == (7, 5)
    assert len(model.peer_layers) == 2 and all(p.dim == 16 for p in model.peer_layers)


def test_multihead_is_a_multitask_module():
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    model = _model(head="multihead")
    assert isinstance(model, PEERClassifier) and isinstance(model, MultiTaskModule)
    assert isinstance(model.head, MultiHeadClassifier)
    assert model(torch.randn(4, 64), torch.zeros(4, dtype=torch.long)).shape == (4, 5)
    assert model(torch.randn(4, 64), 0).shape == (4, 5)
    assert not isinstance(_model(head="incremental"), MultiTaskModule)


@pytest.mark.parametrize("head", ["incremental", "multihead", "fixed"])
def test_pickle_and_deepcopy_keep_the_class_and_weights(head):
    model = _model(head=head).eval()
    x = torch.randn(3, 64)
    args = (x, 0) if head == "multihead" else (x,)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model)
        torch.testing.assert_close(clone(*args), model(*args), rtol=0, atol=0)
        assert clone.peer_layers[0].growth.layer is clone.peer_layers[0]


def test_peer_defaults_and_overrides():
    model = PEERClassifier(64, 3, hidden=32, peer={"num_keys": 5, "sparse_grad": False})
    layer = model.peer_layers[0]
    assert layer.num_experts == 25 and not layer.sparse_grad
    assert layer.heads == PEER_DEFAULTS["heads"] and layer.query_norm_kind == "layer"


def test_growth_is_attached_with_the_default_policy():
    from peer_ll.strategies import GrowthPolicy

    model = _model()
    assert model.peer_layers[0].growth.policy == GrowthPolicy()
    fixed = _model(growth=GrowthPolicy(when="never"))
    assert fixed.peer_layers[0].growth.policy.when == "never"


def test_incremental_head_grows_with_new_classes():
    from types import SimpleNamespace

    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    from peer_ll.strategies import GrowthPolicy

    model = _model(growth=GrowthPolicy(max_experts=32))
    exp = SimpleNamespace(current_experience=1, classes_in_this_experience=[7], task_labels=[0])
    avalanche_model_adaptation(model, exp)
    assert model(torch.randn(2, 64)).shape == (2, 8)
    assert model.peer_layers[0].num_segments == 2  # the pool grew for experience 1


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(head="many"), ValueError, "head"),
        (dict(hidden=0), ValueError, "hidden"),
        (dict(blocks=1.5), ValueError, "blocks"),
        (dict(peer=[("num_keys", 4)]), TypeError, "peer"),
        (dict(peer={"dim": 8}), ValueError, "dim"),
    ],
)
def test_bad_arguments(kwargs, error, word):
    args = dict(hidden=16, peer=SMALL) | kwargs
    with pytest.raises(error, match=word):
        PEERClassifier(64, 5, **args)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="64 values per sample"):
        _model()(torch.randn(3, 63))


def test_importing_models_does_not_import_avalanche():
    code = "import sys, peer_ll.models; assert 'avalanche' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
