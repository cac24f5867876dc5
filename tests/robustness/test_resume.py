"""Save -> load -> continue equals an uninterrupted run, growth policy state included.

The stream repeats the first experience's classes, so ``GrowthPolicy(when=
"new_classes")`` must remember what it saw: a resumed run that forgot would grow.
"""

import random
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from peer_ll.experts import PEER
from peer_ll.optim import make_optimizer
from peer_ll.strategies import GrowthPolicy, attach_growth


def _stream():
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    keep = y < 4
    x, y = x[keep], y[keep]
    train = [tensor_dataset(x[h], y[h]) for h in (slice(0, 64), slice(64, 128))]
    test = [tensor_dataset(x[200:232], y[200:232])] * 2
    return with_classes_timeline(benchmark_from_datasets(train=train, test=test))


class _LoadOptimizerState:
    """Loads an optimizer state dict once, after Avalanche's first optimizer reset.

    Avalanche resets the optimizer on a strategy's first experience (after
    ``model_adaptation``, before the plugins' ``before_training_exp``).
    """

    def __init__(self, state: dict) -> None:
        self.state = state

    def __getattr__(self, name):  # every other Avalanche callback does nothing
        if name.startswith("before_") or name.startswith("after_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def before_training_exp(self, strategy, **kwargs):
        if self.state is not None:
            strategy.optimizer.load_state_dict(self.state)
            self.state = None


def _strategy(plugins=()):
    from avalanche.training import Naive

    torch.manual_seed(0)
    peer = PEER(16, dim_out=4, num_keys=4, heads=2, topk=4, dim_key=8, capacity=64)
    model = nn.Sequential(nn.Linear(64, 16), peer)
    attach_growth(model, GrowthPolicy(when="new_classes"))
    strategy = Naive(
        model,
        make_optimizer(model, lr=1e-2),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=32,
        device="cpu",
        evaluator=None,
        plugins=list(plugins),
    )
    return strategy, peer


def _seed():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)


def _rng():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng(state):
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@pytest.fixture(scope="module")
def uninterrupted():
    stream = _stream()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy, peer = _strategy()
        _seed()
        for exp in stream.train_stream:
            strategy.train(exp)
    return (
        stream,
        {k: v.clone() if torch.is_tensor(v) else v for k, v in strategy.model.state_dict().items()},
        peer,
    )


def test_uninterrupted_run_does_not_grow_for_seen_classes(uninterrupted):
    _, _, peer = uninterrupted
    assert peer.num_experts == 16 and peer.growth.seen_classes == {0, 1, 2, 3}


def _equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_plain_state_dict_resume_equals_uninterrupted(uninterrupted, tmp_path):
    stream, want, _ = uninterrupted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, _ = _strategy()
        _seed()
        first.train(stream.train_stream[0])
        torch.save(
            {"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict()},
            tmp_path / "ckpt.pt",
        )
        rng = _rng()
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        resumed, peer = _strategy([_LoadOptimizerState(saved["optimizer"])])
        resumed.model.load_state_dict(saved["model"])
        _set_rng(rng)
        resumed.train(stream.train_stream[1])
    assert peer.num_experts == 16
    _equal(resumed.model.state_dict(), want)


def test_avalanche_checkpoint_resume_equals_uninterrupted(uninterrupted, tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    stream, want, _ = uninterrupted
    path = tmp_path / "avalanche.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, _ = _strategy()
        _seed()
        first.train(stream.train_stream[0])
        save_checkpoint(first, str(path))
        rng = _rng()
        resumed, _ = _strategy()
        resumed, start = maybe_load_checkpoint(resumed, str(path))
        _set_rng(rng)
        assert start == 1
        for exp in stream.train_stream[start:]:
            resumed.train(exp)
    assert resumed.model[1].num_experts == 16
    _equal(resumed.model.state_dict(), want)
