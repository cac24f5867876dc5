"""GrowthPolicy and PEERGrowth: growth and freezing per experience."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer
from peer_ll.strategies import GrowthPolicy, PEERGrowth, attach_growth, growth_modules


def _exp(eid, classes=(0, 1), tasks=(0,)):
    return SimpleNamespace(
        current_experience=eid, classes_in_this_experience=list(classes), task_labels=list(tasks)
    )


def _layer(small_peer, **kwargs):
    return PEER(8, **small_peer, **kwargs)


def _grower(small_peer, **policy):
    """A layer with room for 4 segments and its attached PEERGrowth."""
    layer = PEER(8, **small_peer, capacity=64)  # room for 16 sub-keys
    (growth,) = attach_growth(layer, GrowthPolicy(**policy))
    return layer, growth


class _Net(nn.Module):
    def __init__(self, small_peer):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.peer = _layer(small_peer)

    def forward(self, x):
        return self.peer(self.enc(x))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_keys=0), ValueError),
        (dict(num_keys=2.0), TypeError),
        (dict(when="sometimes"), ValueError),
        (dict(freeze="all"), ValueError),
        (dict(max_experts=0), ValueError),
    ],
)
def test_policy_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        GrowthPolicy(**kwargs)


def test_growth_state_round_trips_and_old_checkpoints_load(small_peer):
    layer, growth = _grower(small_peer, when="new_classes")
    growth.adaptation(_exp(1, classes=(3, 5), tasks=(0,)))
    sd = layer.state_dict()
    assert sd["growth._extra_state"]["seen_classes"] == [3, 5]
    fresh, fresh_growth = _grower(small_peer, when="new_classes")
    fresh.load_state_dict(sd)
    assert fresh_growth.seen_classes == {3, 5} and fresh_growth.events == growth.events
    assert fresh.num_experts == layer.num_experts
    old = {k: v for k, v in sd.items() if k != "growth._extra_state"}
    other, other_growth = _grower(small_peer, when="new_classes")
    other.load_state_dict(old)  # a checkpoint from before the growth state was saved
    assert other_growth.seen_classes == set()
    bad = dict(sd, **{"growth._extra_state": {"seen_classes": [-1], "seen_tasks": []}})
    with pytest.raises(ValueError, match="seen_classes must be a list of ints >= 0"):
        _grower(small_peer, when="new_classes")[0].load_state_dict(bad)


def test_attach_keeps_parameter_names_and_state_dict(small_peer):
    net = _Net(small_peer)
    names, keys = [n for n, _ in net.named_parameters()], set(net.state_dict())
    (growth,) = attach_growth(net, GrowthPolicy(max_experts=48))
    assert isinstance(growth, PEERGrowth) and net.peer.growth is growth
    assert [n for n, _ in net.named_parameters()] == names
    assert set(net.state_dict()) == keys | {"peer.growth._extra_state"}  # seen classes, tasks
    assert net.peer.capacity == 48 and net.peer.key_capacity == 12  # 2 growths of 4 keys


def test_attach_without_peer_layer_raises():
    with pytest.raises(ValueError, match="PEER"):
        attach_growth(nn.Linear(3, 3))


def test_attach_migrates_an_existing_optimizer(small_peer):
    net = _Net(small_peer)
    opt = make_optimizer(net)
    net(torch.randn(5, 8)).sum().backward()
    opt.step()
    old_moment = opt.state[net.peer.up]["exp_avg"].clone()
    attach_growth(net, GrowthPolicy(max_experts=32), optimizer=opt)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(net.peer.up) in held
    torch.testing.assert_close(opt.state[net.peer.up]["exp_avg"][:16], old_moment, rtol=0, atol=0)


def test_always_grows_once_per_new_experience_and_freezes_previous(small_peer):
    layer, growth = _grower(small_peer)
    growth.adaptation(_exp(0))  # owns the initial segment already
    assert layer.num_experts == 16
    with torch.no_grad():
        layer.up[:16] += 0.1  # owner 0 trains on experience 0
    growth.adaptation(_exp(1))
    growth.adaptation(_exp(1))  # the same experience again: no second segment
    assert layer.num_experts == 32 and layer.segment_owner.tolist() == [0, 1]
    assert layer.frozen[:16].all() and not layer.frozen[16:].any()
    assert [e.grew for e in growth.events] == [False, True, False]


def test_previous_owners_that_never_trained_stay_free(small_peer):
    """GDumb re-initialises the model each experience: its segments never train."""
    layer, growth = _grower(small_peer)
    growth.adaptation(_exp(0))
    growth.adaptation(_exp(1))
    assert layer.segment_owner.tolist() == [0, 1] and not layer.frozen.any()
    with torch.no_grad():
        layer.down[16:32] -= 0.1  # owner 1 trains
    growth.adaptation(_exp(2))
    assert layer.frozen.tolist() == [False] * 16 + [True] * 16 + [False] * 16


@pytest.mark.parametrize(
    "when, classes, tasks, grows",
    [
        ("new_classes", (0, 1), (0,), False),
        ("new_classes", (2,), (0,), True),
        ("new_tasks", (2,), (0,), False),
        ("new_tasks", (0,), (1,), True),
        ("new_classes_or_tasks", (0,), (1,), True),
        ("never", (5,), (5,), False),
    ],
)
def test_when_decides_on_novelty(small_peer, when, classes, tasks, grows):
    layer, growth = _grower(small_peer, when=when)
    growth.adaptation(_exp(0, classes=(0, 1), tasks=(0,)))
    growth.adaptation(_exp(1, classes=classes, tasks=tasks))
    assert (layer.num_segments == 2) is grows


def test_max_experts_and_num_keys(small_peer):
    layer, growth = _grower(small_peer, num_keys=2, max_experts=22)
    for eid in range(1, 5):
        growth.adaptation(_exp(eid))
    assert layer.num_experts == 16 + 4 + 0  # a second 4-expert growth would pass 22
    assert growth.events[-1].reason == "max_experts=22"


def test_callable_freeze_and_none(small_peer):
    layer, growth = _grower(small_peer, freeze=lambda lay, exp: [exp.current_experience])
    growth.adaptation(_exp(1))
    assert not layer.frozen[:16].any() and layer.frozen[16:].all()
    other, growth = _grower(small_peer, freeze="none")
    growth.adaptation(_exp(1))
    assert not other.frozen.any()


def test_freeze_query_and_keys_flags(small_peer):
    layer, growth = _grower(small_peer, freeze_keys=False, freeze_query=True)
    growth.adaptation(_exp(1))
    assert layer.query_frozen and not layer.key_frozen.any()


def test_no_growth_in_eval_mode(small_peer):
    layer, growth = _grower(small_peer)
    layer.eval()
    growth.adaptation(_exp(3))
    assert layer.num_segments == 1 and growth.events == []


def test_new_classes_needs_classes(small_peer):
    _, growth = _grower(small_peer, when="new_classes")
    with pytest.raises(ValueError, match="classes_in_this_experience"):
        growth.adaptation(SimpleNamespace(current_experience=1, task_labels=[0]))


def test_growth_past_capacity_warns(small_peer):
    layer = _layer(small_peer)
    growth = PEERGrowth(layer, GrowthPolicy())
    with pytest.warns(UserWarning, match="past its capacity"):
        growth.adaptation(_exp(1))
    growth.carries_optimizer_state = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        growth.adaptation(_exp(2))
    assert layer.num_segments == 3


def test_plain_avalanche_strategy_grows_the_pool(small_peer, class_stream):
    from avalanche.training import Naive

    net = _ClassNet(small_peer)
    attach_growth(net, GrowthPolicy(max_experts=48))
    strategy = Naive(model=net, optimizer=make_optimizer(net), train_mb_size=32, evaluator=None)
    for exp in class_stream.train_stream:
        strategy.train(exp)
        strategy.eval(class_stream.test_stream)  # eval-mode adaptation must not grow
    assert net.peer.segment_owner.tolist() == [0, 1, 2]
    assert net.peer.frozen[:32].all() and not net.peer.frozen[32:].any()
    assert len(growth_modules(net)) == 1


class _ClassNet(nn.Module):
    def __init__(self, small_peer):
        super().__init__()
        self.enc = nn.Linear(64, 16)
        self.peer = PEER(16, **small_peer)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.enc(x)
        return self.head(h + self.peer(h))


def test_growth_state_keeps_which_owners_trained():
    """freeze="previous" freezes only owners that trained; a reload must remember which."""
    from peer_ll.strategies.growth import GrowthEvent

    layer = PEER(8, num_keys=4, heads=1, topk=2, dim_key=4, capacity=64)
    model = nn.Sequential(layer)
    attach_growth(model, GrowthPolicy())
    growth = growth_modules(model)[0]
    growth.fingerprints[0] = -1.0  # as if owner 0's experts changed since first seen
    growth.events.append(GrowthEvent(0, True, "novel inputs", 32, 0.5, 1))
    copy = nn.Sequential(PEER(8, num_keys=4, heads=1, topk=2, dim_key=4, capacity=64))
    attach_growth(copy, GrowthPolicy())
    copy.load_state_dict(model.state_dict())
    restored = growth_modules(copy)[0]
    assert restored.fingerprints == growth.fingerprints
    assert restored.events == growth.events
