"""peer_protect: frozen old function, owner scoring in evaluation, replay gate, factory."""

import pytest
import torch

from peer_ll.models import PEERClassifier
from peer_ll.protect import (
    InputOwnerStats,
    OwnerGate,
    OwnerRouted,
    PerOwner,
    QueryOwnerStats,
    peer_protect,
    protect_classifier,
    protect_plugin,
    with_owner_encoder,
    with_owner_head,
    with_owner_norms,
    with_query_adapters,
)
from peer_ll.strategies import GrowthPolicy, attach_growth

COMMON = dict(train_mb_size=32, eval_mb_size=64, evaluator=None)


def _model(small_peer, classes=10):
    model = PEERClassifier(64, classes, hidden=16, peer=small_peer)
    return with_owner_head(with_query_adapters(model, rank=2))


def _test_x(stream, exp, n=40):
    data = stream.test_stream[exp].dataset
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def _out(model, x, owners):
    model.eval()
    with torch.no_grad():
        return model(x, owners=owners)


def test_old_outputs_stay_bit_identical_and_the_trunk_freezes(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="oracle", **COMMON)
    plugin = protect_plugin(strategy)
    assert isinstance(strategy.model, OwnerRouted) and strategy.model.model is model
    x0 = _test_x(class_stream, 0)
    layer = model.blocks[0].peer
    strategy.train(class_stream.train_stream[0])
    old = _out(model, x0, 0)
    trunk = model.encoder[1].weight.detach().clone()
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert layer.segment_owner.tolist() == [0, 1, 2]
    assert model.head.owners == [0, 1, 2] and layer.query_adapter.owners == [0, 1, 2]
    assert torch.equal(model.encoder[1].weight, trunk) and not model.encoder[1].weight.requires_grad
    assert not layer.to_query.weight.requires_grad and plugin.owners_trained == [0, 1, 2]
    assert strategy.model.owner is None  # the training owner is unset after training
    assert torch.equal(_out(model, x0, 0), old)  # owner-restricted: bit-identical
    assert not torch.equal(_out(model, x0, 2), old)  # another owner's experts and head differ
    optimised = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(model.head.copies["2"].weight) in optimised  # new copies reach the optimizer
    assert id(layer.query_adapter.copies["2"].shift) in optimised
    strategy.eval(class_stream.test_stream)  # the oracle: each experience its own owner
    assert plugin.inference_accuracy == {} and strategy.model.owner is None


@pytest.mark.parametrize("inference", ["likelihood", "soft"])
def test_query_likelihood_scores_owners_in_evaluation(inference, small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference=inference, **COMMON)
    scorer = strategy.model.scorer
    assert isinstance(scorer, QueryOwnerStats) and strategy.model.soft == (inference == "soft")
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    assert scorer.count_of(1) == len(class_stream.train_stream[1].dataset)  # one clean pass
    strategy.eval(class_stream.test_stream[:2])
    acc = protect_plugin(strategy).inference_accuracy
    assert sorted(acc) == [0, 1] and all(0.0 <= a <= 1.0 for a in acc.values())
    if inference == "likelihood":  # the digit classes of experiences 0 and 1 differ
        assert sum(acc.values()) / 2 > 0.6


def test_input_scoring_routes_each_input_to_its_owner(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="input", inference_options=dict(rank=4), **COMMON)
    plugin, routed = protect_plugin(strategy), strategy.model
    for exp in class_stream.train_stream:
        strategy.train(exp)
    assert routed.scorer.owners == [0, 1, 2]
    assert len(routed.scorer.groups[1]) == 3  # one Gaussian per class of experience 1
    strategy.eval(class_stream.test_stream)
    acc = plugin.inference_accuracy
    assert sorted(acc) == [0, 1, 2] and sum(acc.values()) / 3 > 0.8
    x = _test_x(class_stream, 1)  # evaluation computes each scored owner's own function
    owners, logp = routed.scorer.scores(model, x)
    best = torch.tensor(owners)[logp.argmax(1)]
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(x), model(x, owners=best))


def test_soft_input_scoring_gives_log_probabilities(small_peer, class_stream):
    with pytest.raises(ValueError, match="temperature must be a float"):
        peer_protect(
            _model(small_peer),
            inference="input",
            inference_options=dict(soft=True, temperature=-1.0),
            **COMMON,
        )
    model = _model(small_peer)
    strategy = peer_protect(
        model, inference="input", inference_options=dict(rank=4, soft=True, top=2), **COMMON
    )
    assert strategy.model.soft and strategy.model.top == 2
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    strategy.eval(class_stream.test_stream[:2])
    assert sorted(protect_plugin(strategy).inference_accuracy) == [0, 1]
    x = _test_x(class_stream, 1)
    strategy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(strategy.model(x).exp().sum(-1), torch.ones(len(x)))


def test_owner_encoder_and_norms_keep_old_owners_exact(small_peer, class_stream):
    model = with_owner_norms(with_owner_encoder(_model(small_peer)))
    with pytest.raises(ValueError, match="inference must be 'input' or 'oracle'"):
        peer_protect(model, inference="likelihood", **COMMON)
    strategy = peer_protect(model, inference="input", **COMMON)
    encoder = model.encoder[1]
    x0 = _test_x(class_stream, 0)
    strategy.train(class_stream.train_stream[0])
    old, first = _out(model, x0, 0), encoder.copies["0"].weight.detach().clone()
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert encoder.owners == [0, 1, 2] and torch.equal(encoder.copies["0"].weight, first)
    assert not torch.equal(encoder.copies["2"].weight, encoder.copies["1"].weight)  # trained
    assert model.norm.owners == [0, 1, 2]
    assert not torch.equal(model.norm.copies["2"].weight, model.norm.copies["0"].weight)
    assert torch.equal(_out(model, x0, 0), old)
    strategy.eval(class_stream.test_stream)
    assert sum(protect_plugin(strategy).inference_accuracy.values()) / 3 > 0.8


def test_replay_gate_keeps_a_balanced_replay_and_scores_owners(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(
        model, inference="gate", mem_size=30, inference_options=dict(steps=60), **COMMON
    )
    plugin, gate = protect_plugin(strategy), strategy.model.scorer
    assert isinstance(gate, OwnerGate)
    for exp in class_stream.train_stream:
        strategy.train(exp)
    assert sorted(plugin.replay) == [0, 1, 2]
    assert [len(x) for x in plugin.replay.values()] == [10, 10, 10]
    assert gate.owners == [0, 1, 2] and gate.fit_accuracy > 0.8
    assert not any(p.requires_grad for p in gate.parameters())  # fit by the gate alone
    strategy.eval(class_stream.test_stream)
    assert sum(plugin.inference_accuracy.values()) / 3 > 0.6


def test_factory_checks_its_arguments(small_peer):
    with pytest.raises(ValueError, match="inference must be one of"):
        peer_protect(_model(small_peer), inference="margin", **COMMON)
    with pytest.raises(ValueError, match="mem_size must be > 0 with inference='gate'"):
        peer_protect(_model(small_peer), inference="likelihood", mem_size=10, **COMMON)
    with pytest.raises(ValueError, match="policy must grow on every experience"):
        peer_protect(_model(small_peer), policy=GrowthPolicy(when="never"), **COMMON)
    with pytest.raises(TypeError, match="plugins must be an iterable"):
        peer_protect(_model(small_peer), plugins="OwnerRouting", **COMMON)
    with pytest.raises(TypeError, match="inference_options must be empty"):
        peer_protect(
            _model(small_peer), inference="oracle", inference_options=dict(rank=2), **COMMON
        )
    model = _model(small_peer)
    strategy = peer_protect(model, **COMMON)
    assert model.blocks[0].peer.growth.policy.freeze_query  # the query freezes too
    assert isinstance(strategy.model.scorer, QueryOwnerStats)


def test_training_owner_must_own_experts(small_peer, class_stream):
    model = PEERClassifier(64, 10, hidden=16, peer=small_peer)
    attach_growth(model)
    strategy = peer_protect(model, **COMMON)
    model.blocks[0].peer.growth.policy = GrowthPolicy(when="never")  # bypasses the check
    strategy.train(class_stream.train_stream[0])
    with pytest.raises(ValueError, match="must own experts in every PEER layer"):
        strategy.train(class_stream.train_stream[1])


def test_protect_classifier_keeps_owner_0_exact_after_a_third_owner(class_stream):
    model = protect_classifier(
        64, 10, experiences=3, hidden=16, num_keys=4, owner_encoder=True, owner_norms=True
    )
    assert len([m for m in model.modules() if isinstance(m, PerOwner)]) == 5
    with pytest.raises(ValueError, match="inference must be 'input' or 'oracle'"):
        peer_protect(model, **COMMON)
    strategy = peer_protect(model, inference="input", **COMMON)
    assert isinstance(strategy.model.scorer, InputOwnerStats)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    x0 = _test_x(class_stream, 0)
    before = _out(model, x0, 0)
    strategy.train(class_stream.train_stream[2])
    assert torch.equal(_out(model, x0, 0), before)  # owner 0's function is untouched
    plain = protect_classifier(64, 10, experiences=3, hidden=16, num_keys=4)
    assert len([m for m in plain.modules() if isinstance(m, PerOwner)]) == 2
