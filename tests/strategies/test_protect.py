"""peer_protect: frozen old function, owner inference, key margins, replay gate, factory."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.models import PEERClassifier
from peer_ll.models.owner_head import OwnerHead, with_owner_head
from peer_ll.strategies import (
    CalibratedMarginInference,
    GateOwnerInference,
    GrowthPolicy,
    KeyMarginProtection,
    ReplayOwnerGate,
    peer_protect,
    protect_plugin,
)

COMMON = dict(train_mb_size=32, eval_mb_size=64, evaluator=None)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(small_peer, classes=10):
    peer = dict(small_peer, query_adapter_rank=2, query_adapter_affine=True)
    return with_owner_head(PEERClassifier(64, classes, hidden=16, head="fixed", peer=peer))


def _test_x(stream, exp, n=40):
    data = stream.test_stream[exp].dataset
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def test_old_outputs_stay_bit_identical_and_the_trunk_freezes(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="oracle", **COMMON)
    plugin = protect_plugin(strategy)
    x0 = _test_x(class_stream, 0)
    layer = model.peer_layers[0]
    strategy.train(class_stream.train_stream[0])
    model.eval()
    layer.eval_owners = 0
    old = model(x0)
    trunk = model.encoder[1].weight.detach().clone()
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert layer.segment_owner.tolist() == [0, 1, 2]
    assert model.head.owners == [0, 1, 2]
    assert torch.equal(model.encoder[1].weight, trunk) and not model.encoder[1].weight.requires_grad
    assert layer.query_frozen and plugin.owners_trained == [0, 1, 2]
    model.eval()
    layer.eval_owners = 0
    assert torch.equal(model(x0), old)  # owner-restricted: the old function is bit-identical
    layer.eval_owners = 2
    assert not torch.equal(model(x0), old)  # another owner's experts and head do differ
    # the head's new parameters reached the optimizer, and the clean statistics pass
    # recorded exactly the last experience's training inputs
    optimised = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(model.head.heads["2"].weight) in optimised
    assert layer.query_stats.count_of(2) == len(class_stream.train_stream[2].dataset)


@pytest.mark.parametrize("inference", ["likelihood", "soft", "margin", "margin-z"])
def test_inference_accuracy_is_recorded_per_experience(inference, small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference=inference, **COMMON)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    strategy.eval(class_stream.test_stream[:2])
    acc = protect_plugin(strategy).inference_accuracy
    assert sorted(acc) == [0, 1]
    assert all(0.0 <= a <= 1.0 for v in acc.values() for a in v.values())
    layer = model.peer_layers[0]
    assert layer.owner_inference is None and layer.eval_owners is None  # switched off after
    if inference == "likelihood":  # the digit classes of experiences 0 and 1 differ
        assert sum(a["blocks.0.peer"] for a in acc.values()) / 2 > 0.6


def test_input_inference_routes_by_input_statistics(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="input", inference_options=dict(rank=4),
                            **COMMON)
    plugin = protect_plugin(strategy)
    for exp in class_stream.train_stream:
        strategy.train(exp)
    assert plugin.input_stats.owners == [0, 1, 2]
    assert len(plugin.input_stats.groups[1]) == 3  # one Gaussian per class of experience 1
    strategy.eval(class_stream.test_stream)
    acc = plugin.inference_accuracy
    assert sorted(acc) == [0, 1, 2] and all(list(v) == ["input"] for v in acc.values())
    assert sum(v["input"] for v in acc.values()) / 3 > 0.8  # digit classes differ per experience
    layer = model.peer_layers[0]
    assert layer.eval_owners is None and not model._forward_pre_hooks  # switched off after
    # what evaluation computed is the owner-restricted function of each inferred owner
    x = _test_x(class_stream, 1)
    owners = plugin.input_stats.infer(x)
    model.eval()
    layer.eval_owners = owners
    want = model(x)
    handle = plugin.input_stats.attach(model)
    assert torch.equal(model(x), want)
    handle.remove()


def test_soft_input_inference_mixes_owners_in_evaluation(small_peer, class_stream):
    with pytest.raises(ValueError, match="temperature: expected a float > 0, got -1"):
        peer_protect(_model(small_peer), inference="input",
                     inference_options=dict(soft=True, temperature=-1), **COMMON)
    model = _model(small_peer)
    strategy = peer_protect(model, inference="input",
                            inference_options=dict(rank=4, soft=True, top=2), **COMMON)
    plugin = protect_plugin(strategy)
    assert plugin.input_routing_options == dict(soft=True, top=2, temperature=1.0)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    results = strategy.eval(class_stream.test_stream[:2])
    assert results is not None and sorted(plugin.inference_accuracy) == [0, 1]
    assert not model._forward_hooks and not model._forward_pre_hooks  # switched off after
    x = _test_x(class_stream, 1)
    model.eval()
    handle = plugin.input_stats.attach(model, soft=True, top=2)
    mixed = model(x)
    handle.remove()
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(len(x)))  # log-probabilities


def test_owner_encoder_trains_per_owner_and_keeps_old_owners_exact(small_peer, class_stream):
    from peer_ll.models.owner_head import OwnerLinear, with_owner_encoder

    model = with_owner_encoder(_model(small_peer))
    with pytest.raises(ValueError, match="inference must be 'input' or 'oracle'"):
        peer_protect(model, inference="likelihood", **COMMON)
    strategy = peer_protect(model, inference="input", **COMMON)
    encoder = model.encoder[1]
    assert isinstance(encoder, OwnerLinear)
    x0 = _test_x(class_stream, 0)
    strategy.train(class_stream.train_stream[0])
    model.eval()
    model.peer_layers[0].eval_owners = 0
    old, first = model(x0), encoder.heads["0"].weight.detach().clone()
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert encoder.owners == [0, 1, 2] and torch.equal(encoder.heads["0"].weight, first)
    assert not torch.equal(encoder.heads["2"].weight, encoder.heads["1"].weight)  # trained
    model.eval()
    model.peer_layers[0].eval_owners = 0
    assert torch.equal(model(x0), old)
    model.peer_layers[0].eval_owners = "infer"
    with pytest.raises(ValueError, match="needs each input's owner before the forward"):
        model(x0)
    model.peer_layers[0].eval_owners = None
    strategy.eval(class_stream.test_stream)
    acc = protect_plugin(strategy).inference_accuracy
    assert sum(v["input"] for v in acc.values()) / 3 > 0.8


def test_protect_with_owner_norms_keeps_old_owners_exact(small_peer, class_stream):
    from peer_ll.models.owner_copies import with_owner_norms

    peer = dict(small_peer, query_adapter_rank=2, query_adapter_affine=True)
    model = with_owner_norms(with_owner_head(
        PEERClassifier(64, 10, hidden=16, head="fixed", peer=peer)))
    strategy = peer_protect(model, inference="input", train_mb_size=32, eval_mb_size=64,
                            evaluator=None)
    data = class_stream.test_stream[0].dataset
    x0 = torch.stack([data[i][0] for i in range(30)])
    strategy.train(class_stream.train_stream[0])
    model.eval()
    model.peer_layers[0].eval_owners = 0
    old = model(x0)
    for exp in class_stream.train_stream[1:]:
        strategy.train(exp)
    assert model.norm.owners == [0, 1, 2]
    assert not torch.equal(model.norm.copies["2"].weight, model.norm.copies["0"].weight)
    model.eval()
    model.peer_layers[0].eval_owners = 0
    assert torch.equal(model(x0), old)


def test_key_margin_plugin_adds_its_loss_from_the_second_experience(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="all", key_margin=1.0, margin=5.0, **COMMON)
    (km,) = [p for p in strategy.plugins if isinstance(p, KeyMarginProtection)]
    strategy.train(class_stream.train_stream[0])
    assert km.last_loss == 0.0  # no old owner yet
    strategy.train(class_stream.train_stream[1])
    assert km.last_loss > 0.0  # a margin of 5 is violated by untrained new keys


def test_replay_gate_keeps_a_balanced_buffer_and_infers_owners(small_peer, class_stream):
    model = _model(small_peer)
    strategy = peer_protect(model, inference="gate", mem_size=30,
                            inference_options=dict(steps=60), **COMMON)
    (gate,) = [p for p in strategy.plugins if isinstance(p, ReplayOwnerGate)]
    for exp in class_stream.train_stream:
        strategy.train(exp)
    assert sorted(gate.buffer) == [0, 1, 2]
    assert [len(x) for x, _ in gate.buffer.values()] == [10, 10, 10]
    assert gate.fit_accuracy["blocks.0.peer"] > 0.8
    strategy.eval(class_stream.test_stream)
    acc = protect_plugin(strategy).inference_accuracy
    assert sum(v["blocks.0.peer"] for v in acc.values()) / 3 > 0.6


def _separated(n=64):
    """A PEER layer whose input is its query; owners 0 and 1 see opposite clusters."""
    layer = PEER(16, num_keys=4, heads=2, topk=3, dim_key=8, query_norm=None)
    layer.grow(4, owner=1)
    with torch.no_grad():
        layer.to_query.weight.copy_(torch.eye(16))
    centre = 2 * torch.randn(16)
    xs = {0: centre + 0.3 * torch.randn(n, 16), 1: -centre + 0.3 * torch.randn(n, 16)}
    for owner in (0, 1):
        off = int(layer.segments[owner, 0])
        sign = 1.0 if owner == 0 else -1.0
        with torch.no_grad():  # keys along their owner's cluster (head 0's halves)
            layer.sub_keys[off:off + 4, 0] = sign * centre[:4] + 0.1 * torch.randn(4, 4)
            layer.sub_keys[off:off + 4, 1] = sign * centre[4:8] + 0.1 * torch.randn(4, 4)
        layer.training_owner = owner
        layer(xs[owner])
    return layer.eval(), xs


@pytest.mark.parametrize("kind", ["gate", "margin-z"])
def test_well_separated_owners_are_inferred_right(kind):
    layer, xs = _separated()
    x = torch.cat([xs[0][:10], xs[1][:10]])
    truth = torch.tensor([0] * 10 + [1] * 10)
    if kind == "gate":
        inference = GateOwnerInference(steps=50)
        q = torch.cat([layer.query(xs[0]), layer.query(xs[1])])
        inference.fit(layer, q, torch.tensor([0] * 64 + [1] * 64))
    else:
        inference = CalibratedMarginInference(num_samples=64)
    owners, scores = inference.scores(layer, layer.query(x))
    assert owners == [0, 1]
    assert torch.equal(torch.tensor(owners)[scores.argmax(1)], truth)


def test_factory_checks_its_arguments(small_peer):
    with pytest.raises(ValueError, match="inference must be one of"):
        peer_protect(_model(small_peer), inference="task-label", **COMMON)
    with pytest.raises(ValueError, match="mem_size > 0 goes with inference='gate'"):
        peer_protect(_model(small_peer), inference="likelihood", mem_size=10, **COMMON)
    with pytest.raises(ValueError, match="policy must grow on every experience"):
        peer_protect(_model(small_peer), policy=GrowthPolicy(when="never"), **COMMON)
    with pytest.raises(TypeError, match="plugins must be an iterable"):
        peer_protect(_model(small_peer), plugins=KeyMarginProtection(), **COMMON)
    with pytest.raises(TypeError, match="inference must be a GateOwnerInference"):
        ReplayOwnerGate(CalibratedMarginInference(), mem_size=5)
    model = _model(small_peer)
    strategy = peer_protect(model, **COMMON)
    assert model.peer_layers[0].growth.policy.freeze_query  # the trunk's query freezes too
    assert isinstance(model.head, OwnerHead) and protect_plugin(strategy).inference is not None


def test_training_owner_must_own_experts(small_peer, class_stream):
    model = PEERClassifier(64, 10, hidden=16, head="fixed", peer=small_peer)
    strategy = peer_protect(model, **COMMON)
    model.peer_layers[0].growth.policy = GrowthPolicy(when="never")  # bypasses the check
    strategy.train(class_stream.train_stream[0])
    with pytest.raises(ValueError, match="must own experts in every PEER layer"):
        strategy.train(class_stream.train_stream[1])


def test_protect_classifier_builds_the_full_method(class_stream):
    from peer_ll.models.owner_copies import OwnerCopies
    from peer_ll.models.owner_head import OwnerLinear
    from peer_ll.strategies import protect_classifier

    model = protect_classifier(64, 10, experiences=3, hidden=16, num_keys=4,
                               owner_encoder=True, owner_norms=True)
    kinds = [type(m) for m in model.modules()]
    assert OwnerHead in kinds and OwnerLinear in kinds and OwnerCopies in kinds
    with pytest.raises(ValueError, match="inference must be 'input' or 'oracle'"):
        peer_protect(model, **COMMON)
    strategy = peer_protect(model, inference="input", **COMMON)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    x0 = _test_x(class_stream, 0)
    model.eval()
    model.peer_layers[0].eval_owners = 0
    before = model(x0)
    strategy.train(class_stream.train_stream[2])
    model.eval()
    model.peer_layers[0].eval_owners = 0
    assert torch.equal(model(x0), before)  # owner 0's function is untouched by owner 2
    plain = protect_classifier(64, 10, experiences=3, hidden=16, num_keys=4)
    assert OwnerLinear not in [type(m) for m in plain.modules()]

