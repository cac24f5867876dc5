"""Task-free growth: NoveltyTrigger, callable GrowthPolicy.when, online streams, GDumb."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer
from peer_ll.strategies import (
    GrowthDecision,
    GrowthPolicy,
    NoveltyTrigger,
    attach_growth,
    peer_classifier,
    peer_grow,
)


def _digits(classes):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target)
    keep = y < classes
    return x[keep], y[keep]


def _exp(eid, x):
    return SimpleNamespace(current_experience=eid, dataset=TensorDataset(x, x[:, 0].long()))


def _digit_batches(classes, n, size=10, seed=0):
    x, y = _digits(10)
    pool = x[torch.isin(y, torch.tensor(classes))]
    g = torch.Generator().manual_seed(seed)
    return [pool[torch.randint(len(pool), (size,), generator=g)] for _ in range(n)]


def test_stationary_data_never_grows_and_a_shift_grows_once():
    trigger = NoveltyTrigger(window=50, threshold=2.0, cooldown=100)
    same = [trigger.observe(x) for x in _digit_batches([0, 1, 2, 3, 4], 30)]
    assert not any(d.grow for d in same)
    assert max(d.signal for d in same[1:]) < 2.0
    # a domain shift: the same digits, inverted
    shifted = [trigger.observe(1 - x) for x in _digit_batches([0, 1, 2, 3, 4], 30, seed=1)]
    assert sum(d.grow for d in shifted) == 1
    grew = next(d for d in shifted if d.grow)
    assert grew.signal > 2.0 and "novelty" in grew.reason
    assert len(trigger.owners) == 2


def test_trigger_arguments_are_checked():
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        NoveltyTrigger(window=0)
    with pytest.raises(ValueError, match="threshold"):
        NoveltyTrigger(threshold=-1.0)


def test_callable_when_numbers_owners_and_records_signals(small_peer):
    layer = PEER(8, **small_peer, capacity=64)
    answers = iter([GrowthDecision(False, 0.5, "low"), GrowthDecision(True, 3.0, "high"), True])
    (growth,) = attach_growth(layer, GrowthPolicy(when=lambda g, e: next(answers)))
    x = torch.randn(4, 8)
    for eid in (7, 7, 9):  # experience ids say nothing about owners
        growth.adaptation(_exp(eid, x))
    assert layer.segment_owner.tolist() == [0, 1, 2]
    assert [(e.grew, e.signal, e.owner) for e in growth.events] == [
        (False, 0.5, None), (True, 3.0, 1), (True, None, 2),
    ]  # fmt: skip


def test_callable_when_respects_max_experts(small_peer):
    layer = PEER(8, **small_peer, capacity=64)
    (growth,) = attach_growth(layer, GrowthPolicy(when=lambda g, e: True, max_experts=32))
    for eid in range(3):
        growth.adaptation(_exp(eid, torch.randn(4, 8)))
    assert layer.num_experts == 32
    assert [e.grew for e in growth.events] == [True, False, False]
    assert "max_experts=32" in growth.events[-1].reason


def _online(small_peer, bench, policy, experience_size=30):
    from avalanche.benchmarks import split_online_stream

    model = peer_classifier(64, 10, hidden=16, peer=small_peer, head="fixed", growth=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = peer_grow(model, optimizer=make_optimizer(model, lr=1e-2),
                             criterion=torch.nn.CrossEntropyLoss(), train_mb_size=10,
                             evaluator=None)  # fmt: skip
    stream = split_online_stream(bench.train_stream, experience_size, shuffle=True, seed=0,
                                 access_task_boundaries=False)  # fmt: skip
    return model, strategy, stream


def test_the_default_policy_refuses_online_mini_experiences(small_peer, class_stream):
    model, strategy, stream = _online(small_peer, class_stream, GrowthPolicy(max_experts=64))
    with pytest.raises(ValueError, match="when='always'.*OnlineCLExperience.*NoveltyTrigger"):
        strategy.train(next(iter(stream)))
    assert model.peer_layers[0].num_experts == 16  # the failing call changed nothing


def test_novelty_grows_on_an_online_stream_without_boundaries(small_peer, class_stream):
    trigger = NoveltyTrigger(window=30, threshold=2.0, cooldown=60)
    policy = GrowthPolicy(when=trigger, max_experts=64)
    model, strategy, stream = _online(small_peer, class_stream, policy)
    n = 0
    for exp in stream:
        strategy.train(exp)
        n += 1
    layer = model.peer_layers[0]
    events = layer.growth.events
    assert len(events) == n and n >= 9
    assert 2 <= layer.num_segments <= 3  # 3 class groups, not one segment per mini-batch
    assert all(e.signal is not None for e in events[1:])
    assert layer.segment_owner.tolist() == list(range(layer.num_segments))


def test_gdumb_with_growth_leaves_untrained_segments_free(small_peer, class_stream):
    from avalanche.training import GDumb

    model = peer_classifier(64, 10, hidden=16, peer=small_peer,
                            growth=GrowthPolicy(max_experts=48))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = GDumb(model=model, optimizer=make_optimizer(model, lr=1e-2),
                         criterion=torch.nn.CrossEntropyLoss(), mem_size=60,
                         train_mb_size=16, evaluator=None)  # fmt: skip
        for exp in class_stream.train_stream:
            strategy.train(exp)
    layer = strategy.model.peer_layers[0]
    assert layer.num_experts == 48
    assert not layer.frozen.any()  # the re-initialised segments never trained before
