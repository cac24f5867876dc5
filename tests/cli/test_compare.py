"""``peer-ll run`` and ``peer-ll report`` on tiny configurations of digits streams."""

import json
import math

import numpy as np
import pytest
from torch import nn

from peer_ll.cli import main as cli
from peer_ll.cli.compare import parse_seeds, parse_stream, run_comparison
from peer_ll.cli.strategies_zoo import (
    DEFAULT_STRATEGIES,
    STRATEGIES,
    ZooConfig,
    parameter_counts,
)
from peer_ll.experts import PEER

TINY = ["--epochs", "1", "--seeds", "1", "--experiences", "3", "--max-train-per-exp", "60",
        "--max-test-per-exp", "30", "--num-keys", "8", "--hidden", "16", "--replay-budget", "30",
        "--top-t", "8"]  # fmt: skip
KEYS = ["accuracy_matrix", "avg_accuracy", "bwt", "forgetting", "learning_accuracy",
        "intransigence", "params_total", "params_active", "seconds"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli(["run", *TINY, "--strategies", "naive,peer-grow,joint", "--out", str(out)])
    assert code == 0
    return out


def test_run_writes_results_and_plots(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["stream"] == "digits-class" and results["config"]["seeds"] == [0]
    assert list(results["strategies"]) == ["Naive", "PEER growth", "Joint"]
    for name, s in results["strategies"].items():
        for key in KEYS:
            assert key in s and f"{key}_std" in s, (name, key)
        assert np.shape(s["accuracy_matrix"]) == (3, 3)
        assert len(s["per_seed"]) == 1 and np.shape(s["per_seed"][0]["accuracy_matrix"]) == (3, 3)
        assert 0.0 <= s["avg_accuracy"] <= 1.0 and s["seconds"] > 0
    grow = results["strategies"]["PEER growth"]
    share = np.array(grow["routing"]["blocks.0.peer"]["share"])
    assert share.shape == (3, 3)  # three experiences' inputs over three owners
    np.testing.assert_allclose(share.sum(axis=1), 1.0, atol=1e-6)
    assert np.shape(grow["health"]["effective_rank"]) == (3, 3)
    joint = results["strategies"]["Joint"]
    assert joint["bwt"] == 0.0 and joint["intransigence"] == 0.0
    naive = results["strategies"]["Naive"]
    # intransigence against the joint row of the same seed
    expect = np.mean(np.array(joint["accuracy_matrix"][-1]) - np.diag(naive["accuracy_matrix"]))
    assert naive["intransigence"] == pytest.approx(expect)
    files = {p.name for p in run_dir.iterdir()}
    assert {
        "results.json",
        "table.txt",
        "accuracy_curves.png",
        "accuracy_matrix_peer-growth.png",
        "routing_share_peer-growth.png",
    } <= files
    assert "routing_share_naive.png" not in files  # a fixed pool has one owner
    log = (run_dir / "logs" / "peer-grow-seed0.log").read_text()
    assert "PEER_Usage/blocks.0.peer" in log and "CL_Forgetting/eval_phase/test_stream" in log


def test_metrics_agree_with_avalanches(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    for name in ("Naive", "PEER growth"):
        record = results["strategies"][name]["per_seed"][0]
        R = np.array(record["accuracy_matrix"])
        first = np.mean(np.diag(R)[:-1] - R[-1, :-1])  # Avalanche's forgetting: first - last
        assert record["avalanche"]["forgetting"] == pytest.approx(first)
        assert record["avalanche"]["bwt"] == pytest.approx(record["bwt"])
        assert record["forgetting"] >= first - 1e-12  # Chaudhry's max kind bounds it


def test_report_prints_table_and_redraws(run_dir, capsys):
    (run_dir / "accuracy_curves.png").unlink()
    assert cli(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (run_dir / "table.txt").read_text().strip() in out
    assert (run_dir / "accuracy_curves.png").stat().st_size > 2000
    assert cli(["report", str(run_dir / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_every_strategy_runs_on_a_task_stream():
    config = ZooConfig(epochs=1, hidden=16, num_keys=8, replay_budget=20, top_t=8)
    keys = [*DEFAULT_STRATEGIES, "peer-grow-noreplay"]
    results = run_comparison(
        "digits-task", strategies=keys, seeds=(3,), config=config, n_experiences=2,
        max_train_per_exp=40, max_test_per_exp=20, progress=False,
    )  # fmt: skip
    assert list(results["strategies"]) == [STRATEGIES[k] for k in keys]
    for name, s in results["strategies"].items():
        R = np.array(s["accuracy_matrix"])
        assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1)), name
        assert not math.isnan(s["intransigence"]), name
    grow, naive = results["strategies"]["PEER growth"], results["strategies"]["Naive"]
    # growth: 2 segments of 8² experts, 16 sub-key rows; fixed pool: round(8·√2)² = 121
    # experts, 11 sub-key rows. Expert rows hold 16 + 16 values, sub-key rows dim_key = 32.
    assert grow["params_total"] - naive["params_total"] == (128 - 121) * 32 + (16 - 11) * 32
    # one input uses heads · topk = 32 of the 128 experts
    assert grow["params_total"] - grow["params_active"] == (128 - 32) * 32
    assert results["config"]["seeds"] == [3] and results["environment"]["cpus"] >= 1


def test_domain_stream_and_argument_errors(tmp_path, capsys):
    results = run_comparison(
        "digits-permuted", strategies=["peer-grow"], seeds=(0,), n_experiences=2,
        config=ZooConfig(epochs=1, hidden=16, num_keys=8, replay_budget=20),
        max_train_per_exp=40, max_test_per_exp=20, progress=False,
    )  # fmt: skip
    share = results["strategies"]["PEER growth"]["routing"]["blocks.0.peer"]["share"]
    assert np.shape(share) == (2, 2)
    assert math.isnan(results["strategies"]["PEER growth"]["intransigence"])  # no joint run
    assert cli(["run", "--stream", "digits-sideways", "--out", str(tmp_path)]) == 2
    assert "stream must be DATASET-KIND" in capsys.readouterr().err
    assert cli(["run", "--strategies", "naive,magic", "--out", str(tmp_path)]) == 2
    assert "magic" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    assert parse_stream("fashion-mnist-task") == ("fashion-mnist", "task")
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7]
    with pytest.raises(ValueError, match="--seeds: expected a count N >= 1"):
        parse_seeds("0")


def test_parameter_counts_hand_computed():
    model = nn.Sequential(
        nn.Linear(10, 16),
        PEER(16, num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer", capacity=64),
    )
    # Linear 176, query 256, LayerNorm 16, live rows: down 16·16, up 16·16, sub-keys 4·8;
    # the 48 reserved rows do not count.
    assert parameter_counts(model) == (992, 992 - (16 - 2 * 4) * (16 + 16))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        parameter_counts("model")


def test_parameter_counts_keep_one_copy_of_per_owner_modules_active():
    from peer_ll.protect import protect_classifier

    model = protect_classifier(
        10,
        3,
        experiences=2,
        hidden=8,
        num_keys=2,
        adapter_rank=1,
        owner_encoder=True,
        peer=dict(heads=1, topk=2),
    )
    layer = model.peer_layers[0]
    total_1, active_1 = parameter_counts(model)
    rows_1 = layer.num_sub_keys
    model.encoder[1].add_owner(1)  # PerOwner: its copies are Linear(10, 8)
    model.head.add_owner(1, classes=[2])
    layer.query_adapter.add_owner(1)
    layer.grow(2, owner=1)  # 4 experts
    total_2, active_2 = parameter_counts(model)
    adapter = sum(p.numel() for p in layer.query_adapter.copies["0"].parameters())
    head = sum(p.numel() for p in model.head.copies["0"].parameters())
    keys = (layer.num_sub_keys - rows_1) * layer.dim_key
    grown = 4 * (layer.dim + layer.dim_out) + keys
    assert total_2 - total_1 == (10 * 8 + 8) + adapter + head + grown
    # the new owner's copies are not active, nor are new experts (k = 2 of 4, then of 8)
    assert active_2 - active_1 == keys
