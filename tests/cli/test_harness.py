"""The experiment harness (run loop, evaluator) and the one RESULTS.md writer."""

import logging
import math

import pytest
import torch

from peer_ll.cli.harness import evaluator, run_stream
from peer_ll.cli.results import TITLE, environment_line, write_section
from peer_ll.cli.strategies_zoo import ZooConfig, build_strategy, stream_info

CONFIG = ZooConfig(epochs=1, hidden=16, num_keys=8, replay_budget=30, top_t=8)


@pytest.fixture(scope="module")
def bench():
    from peer_ll.data import make_stream

    return make_stream("digits", kind="class", n_experiences=3, seed=0,
                       max_train_per_exp=40, max_test_per_exp=20)  # fmt: skip


def _strategy(bench, key="naive"):
    torch.manual_seed(0)
    return build_strategy(key, stream_info(bench, "class"), CONFIG,
                          evaluator=evaluator(confidence=False, plasticity=False))  # fmt: skip


def test_seen_evaluates_the_lower_triangle(bench, caplog):
    with caplog.at_level(logging.INFO, logger="peer_ll.cli.harness"):
        rows, values = run_stream(_strategy(bench), bench, evaluate="seen", desc="naive")
    logged = [r.getMessage() for r in caplog.records if r.name == "peer_ll.cli.harness"]
    assert len(logged) == 3 and logged[-1].startswith("naive: experience 3/3, accuracy [")
    R = [row["accuracy"] for row in rows]
    assert len(R) == 3
    for i in range(3):
        assert all(0.0 <= R[i][j] <= 1.0 for j in range(i + 1))
        assert all(math.isnan(R[i][j]) for j in range(i + 1, 3))
    assert values["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002"] == R[2][2]
    layer = list(rows[-1]["routing"])[-1]  # the PEER layer's routing share, per experience
    share = rows[-1]["routing"][layer]["share"]
    assert len(share) == 3 and all(sum(s) == pytest.approx(1.0) for s in share)


def test_all_fills_the_matrix_and_joint_repeats_its_row(bench):
    rows, _ = run_stream(_strategy(bench), bench, evaluate="all")
    assert not any(math.isnan(a) for row in rows for a in row["accuracy"])
    rows, _ = run_stream(_strategy(bench, "joint"), bench, joint=True)
    assert [row["accuracy"] for row in rows] == [rows[0]["accuracy"]] * 3


def test_bad_evaluate_raises_before_training(bench):
    strategy = _strategy(bench)
    before = [p.detach().clone() for p in strategy.model.parameters()]
    with pytest.raises(ValueError, match=r"evaluate must be one of \('all', 'seen'\), got 'some'"):
        run_stream(strategy, bench, evaluate="some")
    assert all(torch.equal(a, b) for a, b in zip(before, strategy.model.parameters(),
                                                 strict=True))  # fmt: skip


HEADING = "## Scores (scores.py)"
OTHER = "## Other (other.py)"


def test_write_section_creates_appends_and_replaces(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, HEADING, "run 1")
    assert path.read_text() == f"{TITLE}\n{HEADING}\n\nrun 1\n"
    write_section(path, OTHER, "other run")
    write_section(path, HEADING, "run 2\n")
    text = path.read_text()
    assert text == f"{TITLE}\n{HEADING}\n\nrun 1\n\nrun 2\n\n{OTHER}\n\nother run\n"
    write_section(path, HEADING, "table\n\nNotes: by hand\n", replace=True, keep_from="Notes:")
    write_section(path, HEADING, "new table", replace=True, keep_from="Notes:")
    assert path.read_text() == (f"{TITLE}\n{HEADING}\n\nnew table\n\nNotes: by hand\n\n"
                                f"{OTHER}\n\nother run\n")  # fmt: skip
    write_section(path, OTHER, "only this", replace=True)
    assert path.read_text().endswith(f"{OTHER}\n\nonly this\n")


def test_write_section_errors_change_nothing(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, HEADING, "run 1")
    before = path.read_text()
    with pytest.raises(ValueError, match="heading must be one line starting with '## '"):
        write_section(path, "# Scores", "x")
    with pytest.raises(ValueError, match="keep_from must be None unless replace=True"):
        write_section(path, HEADING, "x", keep_from="Notes")
    with pytest.raises(ValueError, match="replace must be one of"):
        write_section(path, HEADING, "x", replace="yes")
    assert path.read_text() == before


def test_environment_line_names_machine_and_versions():
    line = environment_line()
    assert line.startswith("Date: ") and f"torch {torch.__version__}" in line
    assert "CPUs" in line and "avalanche" in line


def test_environment_line_takes_the_runs_date():
    env = {"date": "2026-01-01T00:00:00", "cpus": 2, "gpu": None, "device": "cpu",
           "torch_threads": 1, "python": "3.11", "torch": "2.x", "avalanche": "0.6",
           "numpy": "2.x"}  # fmt: skip
    assert environment_line(env).startswith("Date: 2026-01-01T00:00:00; machine: 2 CPUs, GPU: none")
    assert environment_line(env, date="runs of 2025-12-30").startswith("Date: runs of 2025-12-30;")
