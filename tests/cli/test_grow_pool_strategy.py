"""``peer-ll run --strategies peer-grow-pool``: growth into one pool on a domain stream."""

import numpy as np
import pytest

from peer_ll.cli import main as cli
from peer_ll.cli.compare import run_comparison
from peer_ll.cli.strategies_zoo import STRATEGIES, StreamInfo, ZooConfig, build_strategy
from peer_ll.strategies.pool_growth_plugin import PoolGrowthPlugin

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grow_pool_runs_on_a_permuted_stream_with_one_retrieval():
    config = ZooConfig(epochs=1, hidden=16, num_keys=4, batch_size=16)
    results = run_comparison(
        "digits-permuted", strategies=["peer-grow-pool"], seeds=(0,), config=config,
        n_experiences=2, max_train_per_exp=48, max_test_per_exp=20, progress=False,
    )  # fmt: skip
    s = results["strategies"][STRATEGIES["peer-grow-pool"]]
    R = np.array(s["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    share = np.array(s["routing"]["blocks.0.peer"]["share"])
    assert share.shape == (2, 2) and share[1].sum() > 0  # the grown segment is retrieved


def test_grow_pool_strategy_holds_a_pool_model_and_its_plugin():
    info = StreamInfo("permuted", in_features=64, n_classes=10, classes_per_exp=10,
                      n_experiences=2)  # fmt: skip
    strategy = build_strategy("peer-grow-pool", info, ZooConfig(hidden=16, num_keys=4))
    assert strategy.model.growth == "pool"
    plugin = next(p for p in strategy.plugins if isinstance(p, PoolGrowthPlugin))
    assert plugin.growth.config.pseudo_queries == 32  # ZooConfig's batch size
    assert plugin.growth.config.own_query and plugin.growth.config.pseudo == "inputs"
    assert strategy.model.blocks[0].peer.capacity == 2 * 16  # room for one segment each


def test_grow_pool_refuses_streams_with_new_classes(tmp_path, capsys):
    code = cli(["run", "--stream", "digits-class", "--strategies", "peer-grow-pool",
                "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "permuted or rotated stream for ['peer-grow-pool']" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
