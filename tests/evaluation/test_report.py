"""Run summaries, the table, results.json and the plots, on hand-computed matrices."""

import json
import math

import numpy as np
import pytest

from peer_ll.evaluation.plots import draw_run_plots, plot_accuracy_matrix, slug
from peer_ll.evaluation.report import (
    load_results,
    results_table,
    seed_scalars,
    summarize,
    write_results,
)

R0 = [[0.90, 0.10, 0.20], [0.95, 0.80, 0.30], [0.60, 0.40, 0.95]]
R1 = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.5, 0.5, 1.0]]
JOINT = {0: [0.95, 0.90, 0.95], 1: [1.0, 1.0, 1.0]}
SHARE = [[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.2, 0.7]]


def _records():
    return [
        dict(seed=0, accuracy_matrix=R0, params_total=1000, params_active=400, seconds=2.0,
             routing={"blocks.0.peer": {"share": SHARE, "usage": [0.5, 0.5, 0.5]}},
             health={"dead_units": np.zeros((3, 3)).tolist(),
                     "effective_rank": np.full((3, 3), 4.0).tolist()}),
        dict(seed=1, accuracy_matrix=R1, params_total=1000, params_active=400, seconds=4.0,
             routing={"blocks.0.peer": {"share": SHARE, "usage": [0.7, 0.5, 0.3]}},
             health={"dead_units": np.full((3, 3), 0.5).tolist(),
                     "effective_rank": np.full((3, 3), 2.0).tolist()}),
    ]  # fmt: skip


def test_seed_scalars_hand_computed():
    s = seed_scalars(R0, JOINT[0])
    assert s["avg_accuracy"] == pytest.approx((0.60 + 0.40 + 0.95) / 3)
    assert s["bwt"] == pytest.approx(-0.35)  # (0.60 - 0.90, 0.40 - 0.80)
    assert s["forgetting"] == pytest.approx(0.375)  # (0.95 - 0.60, 0.80 - 0.40)
    assert s["learning_accuracy"] == pytest.approx((0.90 + 0.80 + 0.95) / 3)
    assert s["intransigence"] == pytest.approx(0.05)  # (0.05, 0.10, 0.00)
    assert math.isnan(seed_scalars(R0)["intransigence"])


def test_summarize_means_and_sample_std():
    out = summarize(_records(), joint_rows=JOINT)
    # avg accuracy: 0.65 and 2/3; bwt -0.35 and -0.5; forgetting 0.375 and 0.5
    assert out["avg_accuracy"] == pytest.approx((0.65 + 2 / 3) / 2)
    assert out["avg_accuracy_std"] == pytest.approx(abs(0.65 - 2 / 3) / math.sqrt(2))
    assert out["bwt"] == pytest.approx(-0.425)
    assert out["forgetting"] == pytest.approx(0.4375)
    assert out["intransigence"] == pytest.approx(0.025)  # 0.05 and 0.0
    assert out["seconds"] == 3.0 and out["seconds_std"] == pytest.approx(math.sqrt(2))
    assert out["params_total"] == 1000 and out["params_total_std"] == 0.0
    np.testing.assert_allclose(out["accuracy_matrix"], (np.array(R0) + R1) / 2)
    assert np.shape(out["accuracy_matrix_std"]) == (3, 3)
    np.testing.assert_allclose(out["routing"]["blocks.0.peer"]["usage"], [0.6, 0.5, 0.4])
    np.testing.assert_allclose(out["health"]["effective_rank"], np.full((3, 3), 3.0))
    assert [r["seed"] for r in out["per_seed"]] == [0, 1]
    assert out["per_seed"][1]["forgetting"] == pytest.approx(0.5)
    one = summarize(_records()[:1])
    assert one["avg_accuracy_std"] == 0.0 and math.isnan(one["intransigence"])


def test_summarize_errors():
    with pytest.raises(ValueError, match="at least one seed record"):
        summarize([])
    bad = _records()
    bad[1]["accuracy_matrix"] = [[1.0]]
    with pytest.raises(ValueError, match="one accuracy-matrix shape"):
        summarize(bad)


def test_table_and_json_round_trip(tmp_path):
    results = {
        "config": {"stream": "digits-class"},
        "strategies": {"PEER growth": summarize(_records(), joint_rows=JOINT),
                       "Naive": summarize(_records()[:1])},
    }  # fmt: skip
    table = results_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["Strategy", "Avg", "acc"]
    assert "65.8 ± 1.2" in lines[2] and "1.0k" in lines[2] and "2.5 ± 3.5" in lines[2]
    assert "65.0" in lines[3] and "—" in lines[3]  # Naive: one seed, no joint reference
    assert results_table(results, markdown=True).startswith("| Strategy | Avg acc % |")
    path = write_results(tmp_path / "run", results)
    raw = path.read_text()
    assert "NaN" not in raw and json.loads(raw)["strategies"]["Naive"]["intransigence"] is None
    loaded = load_results(tmp_path / "run")
    assert results_table(loaded) == table
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="'strategies' mapping"):
        load_results(tmp_path / "x.json")


def test_plots_written(tmp_path):
    grow = summarize(_records(), joint_rows=JOINT)
    fixed = summarize([{**r, "routing": {"p": {"share": [[1.0]] * 3}}} for r in _records()])
    paths = draw_run_plots({"strategies": {"PEER growth + RD": grow, "Naive": fixed}}, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == [
        "accuracy_curves.png",
        "accuracy_matrix_naive.png",
        "accuracy_matrix_peer-growth-rd.png",
        "routing_share_peer-growth-rd.png",
    ]  # fmt: skip  (one owner: no routing plot for Naive)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    assert slug("EWC") == "ewc"
    with pytest.raises(ValueError, match="R must be a non-empty"):
        plot_accuracy_matrix([1.0, 2.0], tmp_path / "bad.png")


def test_package_exports_load_lazily():
    import peer_ll.evaluation as E
    from peer_ll.evaluation import plugins, report

    assert E.summarize is report.summarize and E.PEERRoutingMetrics is plugins.PEERRoutingMetrics
    assert set(E.__all__) >= {"peer_metrics", "results_table", "draw_run_plots", "routing_share"}
    assert "usage" not in E.__all__ and "unevenness" not in E.__all__  # peer_ll.experts has them
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        E.nope  # noqa: B018


def test_evaluation_values_from_metric_names():
    from peer_ll.evaluation.report import evaluation_values

    s = "eval_phase/test_stream"
    values = {
        f"Top1_Acc_Exp/{s}/Task000/Exp000": 0.9, f"Top1_Acc_Exp/{s}/Task001/Exp001": 0.7,
        f"PEER_Usage/b.peer/{s}/Exp001": 0.25,
        f"PEER_RoutingShare/b.peer/Owner000/{s}/Exp000": 1.0,
        f"PEER_RoutingShare/b.peer/Owner000/{s}/Exp001": 0.4,
        f"PEER_RoutingShare/b.peer/Owner001/{s}/Exp001": 0.6,
        f"Plasticity_EffectiveRank/encoder.2/{s}/Exp000": 3.5,
        "Top1_Acc_Exp/train_phase/train_stream/Task000/Exp000": 0.1,  # not an evaluation
        "StreamForgetting/eval_phase/test_stream": 0.2,  # not per experience
    }  # fmt: skip
    out = evaluation_values(values, 2)
    assert out["accuracy"] == [0.9, 0.7]
    assert out["health"]["effective_rank"][0] == 3.5 and math.isnan(
        out["health"]["effective_rank"][1]
    )
    layer = out["routing"]["b.peer"]
    assert layer["owners"] == [0, 1]
    assert layer["share"][1] == [0.4, 0.6] and layer["share"][0][0] == 1.0
    assert math.isnan(layer["share"][0][1])  # owner 1 did not exist at that evaluation
    assert math.isnan(layer["usage"][0]) and layer["usage"][1] == 0.25
