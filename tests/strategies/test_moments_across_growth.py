"""Old rows keep their optimizer moments when the pool grows, through Avalanche's update."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from peer_ll.optim import make_optimizer
from peer_ll.strategies import GrowthPolicy, peer_classifier, peer_grow

MOMENTS = ("exp_avg", "exp_avg_sq")


class MomentProbe(SupervisedPlugin):
    """Keeps the PEER tables' optimizer state at the end of one experience and the
    start of the next one (after growth and Avalanche's update_optimizer)."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.ends, self.starts = layer, [], []

    def _state(self, strategy):
        state = strategy.optimizer.state
        return {
            name: {m: state[getattr(self.layer, name)][m].clone() for m in MOMENTS}
            | {"param": getattr(self.layer, name)}
            for name in ("down", "up", "sub_keys")
            if state[getattr(self.layer, name)]
        }

    def before_training_exp(self, strategy, **kwargs):
        self.starts.append(self._state(strategy))

    def after_training_exp(self, strategy, **kwargs):
        self.ends.append(self._state(strategy))


def _run(strategy, stream, probe, experiences=2):
    # After every other plugin (CarryOptimizerState included), before the evaluator.
    strategy.plugins.insert(strategy.plugins.index(strategy.evaluator), probe)
    for exp in stream.train_stream[:experiences]:
        strategy.train(exp)
    return probe.ends[0], probe.starts[1]


def _assert_old_rows_kept(end, start, rows):
    assert set(end) == set(start) == {"down", "up", "sub_keys"}
    for name in end:
        n = rows[name]
        for m in MOMENTS:
            assert start[name][m].abs().sum() > 0  # the moments were not reset
            torch.testing.assert_close(start[name][m][:n], end[name][m][:n], rtol=0, atol=0)


def test_growth_within_capacity_keeps_parameters_and_moments(small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    strategy = Naive(model=model, optimizer=make_optimizer(model), train_mb_size=32, evaluator=None)
    end, start = _run(strategy, class_stream, MomentProbe(model.peer_layers[0]))
    assert all(start[name]["param"] is end[name]["param"] for name in end)  # no reallocation
    _assert_old_rows_kept(end, start, {"down": 16, "up": 16, "sub_keys": 4})


def test_growth_past_capacity_carries_moments_with_the_factory(small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy())
    layer = model.peer_layers[0]
    strategy = peer_grow(model, train_mb_size=32, evaluator=None)
    end, start = _run(strategy, class_stream, MomentProbe(layer))
    assert start["down"]["param"] is not end["down"]["param"]  # reallocated
    assert layer.capacity > 16 and start["down"]["exp_avg"].shape[0] == layer.capacity
    _assert_old_rows_kept(end, start, {"down": 16, "up": 16, "sub_keys": 4})
    assert start["down"]["exp_avg"][16:].abs().sum() == 0  # new rows start at zero


def test_growth_past_capacity_in_a_plain_strategy_warns_and_resets(small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy())
    strategy = Naive(model=model, optimizer=make_optimizer(model), train_mb_size=32, evaluator=None)
    probe = MomentProbe(model.peer_layers[0])
    with pytest.warns(UserWarning, match="past its capacity"):
        _run(strategy, class_stream, probe)
    assert set(probe.starts[1]) == set()  # Avalanche reset the replaced tables' state
