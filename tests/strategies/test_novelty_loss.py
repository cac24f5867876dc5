"""LossJumpTrigger: grow when the model's loss on new inputs jumps."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from peer_ll.strategies import GrowthPolicy, LossJumpTrigger


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def _trained_on(classes):
    x, y = _digits()
    keep = torch.isin(y, torch.tensor(classes))
    model = nn.Linear(64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()
    return model


def _batches(classes, n, size=20, seed=0):
    x, y = _digits()
    idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randint(len(idx), (size,), generator=g)] for _ in range(n)]
    return [SimpleNamespace(current_experience=i, dataset=TensorDataset(x[p], y[p]))
            for i, p in enumerate(picks)]  # fmt: skip


def test_grows_at_new_classes_not_on_known_ones_and_keeps_its_cooldown():
    model = _trained_on([0, 1])
    trigger = LossJumpTrigger(model, window=100, threshold=3.0, cooldown=60)
    known = [trigger(None, e) for e in _batches([0, 1], 10)]
    assert not any(d.grow for d in known)
    assert max(d.signal for d in known[1:]) < 3.0
    new = [trigger(None, e) for e in _batches([5, 6], 4, seed=1)]
    assert [d.grow for d in new] == [True, False, False, False]  # then the cooldown
    assert new[0].signal > 3.0 and "loss jump" in new[0].reason
    assert len(trigger.history) == 14 and trigger.history[10][1] == new[0].signal
    assert model.training  # the model's mode is restored


def test_same_experience_asked_twice_gets_one_decision_and_bad_input_raises():
    model = _trained_on([0, 1])
    trigger = LossJumpTrigger(model, cooldown=0)
    exp = _batches([0, 1], 1)[0]
    assert trigger(None, exp) is trigger(None, exp)
    assert len(trigger.history) == 1
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        trigger.observe(torch.zeros(3, 64), torch.zeros(2, dtype=torch.long))
    assert len(trigger.recent) == 20  # the failed call changed nothing
    with pytest.raises(TypeError, match="model"):
        LossJumpTrigger("not a model")
    with pytest.raises(ValueError, match="threshold"):
        LossJumpTrigger(model, threshold=-1.0)
    assert GrowthPolicy(when=trigger).when is trigger
