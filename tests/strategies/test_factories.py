"""Strategy factories: templates plus plugins, the caller's plugins untouched."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import GEM, Naive, Replay
from avalanche.training.templates import SupervisedTemplate

from peer_ll.models import PEERClassifier
from peer_ll.optim import SparseAdamW
from peer_ll.strategies import (
    CarryOptimizerState,
    DenseExpertGrads,
    GrowthPolicy,
    SparseExpertFinetuning,
    attach_growth,
    growth_modules,
    needs_dense_grads,
    peer_classifier,
    peer_grow,
    peer_sparse_finetuning,
    sparse_aware,
)


class Marker(SupervisedPlugin):
    """A plugin that does nothing: tells whether the factory kept the caller's plugins."""


def _model(small_peer, **kwargs):
    return PEERClassifier(64, 10, hidden=16, peer=small_peer, **kwargs)


def _types(strategy):
    return [type(p) for p in strategy.plugins]


def test_peer_grow_builds_a_template_with_the_sparse_optimizer(small_peer):
    model = _model(small_peer)
    mine = [Marker()]
    strategy = peer_grow(model, plugins=mine, train_mb_size=8, evaluator=None)
    assert type(strategy) is SupervisedTemplate
    assert isinstance(strategy.optimizer, SparseAdamW)
    assert isinstance(strategy._criterion, torch.nn.CrossEntropyLoss)
    assert len(mine) == 1 and isinstance(mine[0], Marker)  # caller's list intact
    assert CarryOptimizerState in _types(strategy) and Marker in _types(strategy)
    assert DenseExpertGrads not in _types(strategy)
    assert strategy.train_mb_size == 8


def test_other_templates_and_automatic_dense_grads(small_peer):
    gem = peer_grow(_model(small_peer), template=GEM, patterns_per_exp=4, evaluator=None)
    assert isinstance(gem, GEM) and DenseExpertGrads in _types(gem)
    replay = peer_grow(_model(small_peer), template=Replay, mem_size=10, evaluator=None)
    assert isinstance(replay, Replay) and DenseExpertGrads not in _types(replay)
    model = _model(small_peer)
    adam = peer_grow(model, torch.optim.Adam(model.parameters()), evaluator=None)
    assert DenseExpertGrads in _types(adam)  # stock Adam rejects sparse gradients
    forced = peer_grow(_model(small_peer), dense_grads=True, evaluator=None)
    assert DenseExpertGrads in _types(forced)


def test_policy_retargets_and_plain_models_get_growth(small_peer):
    model = _model(small_peer)
    policy = GrowthPolicy(when="new_classes", max_experts=64)
    peer_grow(model, policy=policy, evaluator=None)
    assert [g.policy for g in growth_modules(model)] == [policy]
    assert model.peer_layers[0].capacity == 64

    from peer_ll.experts import PEER

    plain = torch.nn.Sequential(torch.nn.Linear(64, 16), PEER(16, **small_peer))
    peer_grow(plain, evaluator=None)
    assert len(growth_modules(plain)) == 1


def test_method_factories_add_their_plugin(small_peer):
    sparse = peer_sparse_finetuning(_model(small_peer), top_t=5, evaluator=None)
    assert SparseExpertFinetuning in _types(sparse)


def test_plugins_must_be_an_iterable(small_peer):
    with pytest.raises(TypeError, match="plugins"):
        peer_grow(_model(small_peer), plugins=Marker(), evaluator=None)


def test_sparse_awareness(small_peer):
    model = _model(small_peer)
    assert sparse_aware(SparseAdamW(model.parameters()))
    assert sparse_aware(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert not sparse_aware(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    assert not sparse_aware(torch.optim.AdamW(model.parameters()))
    assert not needs_dense_grads([], SparseAdamW(model.parameters()))


def test_readme_loop(small_peer, class_stream):
    # The README's loop, on the small test stream.
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    strategy = peer_grow(model, train_mb_size=32, evaluator=None)
    results = []
    for experience in class_stream.train_stream:
        strategy.train(experience)
        results.append(strategy.eval(class_stream.test_stream))
    assert len(results) == 3
    assert model.peer_layers[0].segment_owner.tolist() == [0, 1, 2]
    assert model.peer_layers[0].frozen[:32].all()


def test_a_growth_plugin_on_a_model_without_growth_says_what_to_do(small_peer, class_stream):
    model = _model(small_peer)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        plugins=[CarryOptimizerState()],
        train_mb_size=32,
        evaluator=None,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"growth attached.*attach_growth\(model"):
        strategy.train(class_stream.train_stream[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    attach_growth(model, GrowthPolicy(when="never"))
    strategy.train(class_stream.train_stream[0])  # now it runs
