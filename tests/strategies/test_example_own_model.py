"""examples/peer_in_your_model.py runs, and a PEER layer in a user's model fails helpfully."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.training import Naive
from torch import nn

from peer_ll.experts import PEER
from peer_ll.strategies import GrowthPolicy, attach_growth, peer_grow

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_grows_one_segment_per_experience():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "peer_in_your_model.py"),
            "--experiences",
            "2",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    ).stdout
    assert "after experience 0: 64 experts, owners [0], frozen 0" in out, out
    assert "after experience 1: 128 experts, owners [0, 1], frozen 64" in out, out
    assert "owner 0's experts only" in out, out


def _net(**peer):
    return nn.Sequential(
        nn.Linear(64, 16),
        PEER(16, num_keys=4, heads=2, topk=4, dim_key=8, **peer),
        nn.Linear(16, 10),
    )


def test_batchnorm_queries_with_a_batch_of_one_say_what_to_do(class_stream):
    model = _net()
    strategy = peer_grow(model, train_mb_size=1, evaluator=None)
    with pytest.raises(ValueError, match=r"larger batch .* query_norm='layer'"):
        strategy.train(class_stream.train_stream[0])
    layer = model[1]
    layer.eval()  # running statistics: one input is fine
    assert layer(torch.randn(1, 16)).shape == (1, 16)
    fine = peer_grow(_net(query_norm="layer"), train_mb_size=1, train_epochs=1, evaluator=None)
    fine.train(class_stream.train_stream[0])


def test_a_directly_built_strategy_needs_growth_attached_only_with_peer_plugins(class_stream):
    from peer_ll.strategies import CarryOptimizerState

    model = _net()
    attach_growth(model, GrowthPolicy(max_experts=48))
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        plugins=[CarryOptimizerState()],
        train_mb_size=32,
        evaluator=None,
    )
    for experience in class_stream.train_stream[:2]:
        strategy.train(experience)
    assert model[1].segment_owner.tolist() == [0, 1]
