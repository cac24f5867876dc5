"""peer-ll run on online streams: DATASET-online and the task-free PEER strategy."""

import numpy as np

from peer_ll.cli.compare import parse_stream, run_comparison
from peer_ll.cli.strategies_zoo import ZooConfig, build_strategy, stream_info
from peer_ll.data import make_stream
from peer_ll.experts import peer_layers
from peer_ll.strategies.novelty import LossJumpTrigger


def test_online_stream_runs_task_free_and_boundary_growth():
    config = ZooConfig(epochs=5, hidden=16, num_keys=4, replay_budget=20, batch_size=10)
    results = run_comparison(
        "digits-online", strategies=["peer-grow", "peer-grow-online"], seeds=(0,),
        config=config, n_experiences=2, max_train_per_exp=40, max_test_per_exp=20,
        progress=False,
    )  # fmt: skip
    assert parse_stream("fashion-mnist-online") == ("fashion-mnist", "online")
    assert results["config"]["epochs"] == 1  # one pass over an online stream
    grow = results["strategies"]["PEER growth"]
    free = results["strategies"]["PEER task-free growth"]
    for s in (grow, free):
        R = np.array(s["accuracy_matrix"])
        assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))  # one row per base exp
    for rec in grow["per_seed"]:  # the boundaries: one segment per base experience
        assert list(rec["routing"]["blocks.0.peer"]["owners"]) == [0, 1]
    for rec in free["per_seed"]:  # no boundaries: owners numbered by the policy
        owners = list(rec["routing"]["blocks.0.peer"]["owners"])
        assert owners == list(range(len(owners))) and 1 <= len(owners) <= 4


def test_loss_jump_growth_is_a_task_free_run_strategy():
    config = ZooConfig(epochs=5, hidden=16, num_keys=4, replay_budget=20, batch_size=10)
    results = run_comparison(
        "digits-online", strategies=["peer-grow-loss"], seeds=(0,), config=config,
        n_experiences=2, max_train_per_exp=40, max_test_per_exp=20, progress=False,
    )  # fmt: skip
    bench = make_stream("digits", kind="class", n_experiences=2, seed=0)  # online: cut from it
    strategy = build_strategy("peer-grow-loss", stream_info(bench, "online"), config)
    for layer in peer_layers(strategy.model).values():  # the trigger scores the grown model
        trigger = layer.growth.policy.when
        assert isinstance(trigger, LossJumpTrigger) and trigger.model is strategy.model
    run = results["strategies"]["PEER task-free growth, loss jump"]
    assert np.array(run["accuracy_matrix"]).shape == (2, 2)
    for rec in run["per_seed"]:  # no boundaries: owners numbered by the loss-jump policy
        owners = list(rec["routing"]["blocks.0.peer"]["owners"])
        assert owners == list(range(len(owners))) and 1 <= len(owners) <= 4
