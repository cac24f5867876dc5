"""``peer-ll run`` keeps every finished run, resumes mid-stream bit for bit, refuses or
replaces an existing run folder, and survives a strategy whose loss turns NaN."""

import json

import pytest
import torch

import peer_ll.cli.harness as harness
from peer_ll.cli import main as cli

TINY = ["--epochs", "1", "--seeds", "1", "--experiences", "3", "--max-train-per-exp", "40",
        "--max-test-per-exp", "20", "--num-keys", "4", "--hidden", "8", "--replay-budget", "20",
        "--top-t", "4", "--strategies", "naive,peer-grow"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _matrices(run):
    results = json.loads((run / "results.json").read_text())
    return {name: [s["accuracy_matrix"] for s in summary["per_seed"]]
            for name, summary in results["strategies"].items()}, results  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    assert cli(["run", *TINY, "--out", str(run)]) == 0
    return _matrices(run)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception``)."""


def test_a_run_killed_mid_stream_resumes_bit_for_bit(tmp_path, uninterrupted, monkeypatch):
    save = harness.save_stream_checkpoint
    calls = []

    def save_then_die(strategy, path, rows, values):
        save(strategy, path, rows, values)
        calls.append(path)
        if len(calls) == 5:  # naive: 3 experiences; peer-grow: after its 2nd experience
            raise Killed

    monkeypatch.setattr(harness, "save_stream_checkpoint", save_then_die)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        cli(["run", *TINY, "--out", str(run)])
    monkeypatch.setattr(harness, "save_stream_checkpoint", save)
    partial = json.loads((run / "results.json").read_text())
    assert list(partial["strategies"]) == ["Naive"] and partial["complete"] is False
    assert (run / "checkpoints" / "peer-grow-seed0.pkl").is_file()
    assert cli(["run", *TINY, "--out", str(run)]) == 2  # refused without --resume
    assert cli(["run", *TINY, "--out", str(run), "--resume"]) == 0
    matrices, results = _matrices(run)
    assert matrices == uninterrupted[0] and results["complete"] is True
    grow = results["strategies"]["PEER growth"]
    assert grow["params_total"] == uninterrupted[1]["strategies"]["PEER growth"]["params_total"]
    assert not list((run / "checkpoints").iterdir())  # finished runs drop their checkpoint
    assert not list(run.rglob(".tmp-*"))


def test_force_removes_the_old_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (run / "stale_plot.png").write_text("old")
    (run / "logs").mkdir()
    (run / "logs" / "old.log").write_text("old")
    args = ["run", *TINY, "--strategies", "naive", "--experiences", "2", "--out", str(run)]
    assert cli(args) == 2
    assert "pass --resume to continue the run there or --force" in capsys.readouterr().err
    assert (run / "stale_plot.png").exists()
    assert cli([*args, "--force"]) == 0
    assert not (run / "stale_plot.png").exists() and not (run / "logs" / "old.log").exists()
    assert (run / "records" / "naive-seed0.json").is_file()


def test_force_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    assert cli(["run", *TINY, "--out", str(folder), "--force"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "precious"


def test_resume_refuses_other_settings(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["run", *TINY, "--strategies", "naive", "--experiences", "2", "--out", str(run)]
    assert cli(args) == 0
    before = (run / "results.json").read_text()
    assert cli([*args, "--lr", "0.01", "--resume"]) == 2
    assert "was started with other settings (['lr'])" in capsys.readouterr().err
    assert (run / "results.json").read_text() == before


def test_a_non_finite_loss_stops_one_strategy_and_keeps_the_others(tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    import peer_ll.cli.compare as compare

    build = compare.build_strategy

    def build_nan_for_naive(key, info, config, *, evaluator=None):
        strategy = build(key, info, config, evaluator=evaluator)
        if key == "naive":
            strategy._criterion = lambda out, y: out.sum() * float("nan")
        return strategy

    monkeypatch.setattr(compare, "build_strategy", build_nan_for_naive)
    run = tmp_path / "run"
    assert cli(["run", *TINY, "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "peer-ll run: error: Naive, seed 0: NonFiniteLoss: the training loss is nan" in err
    results = json.loads((run / "results.json").read_text())
    assert list(results["strategies"]) == ["PEER growth"]
    assert results["failures"][0]["strategy"] == "naive" and results["complete"] is True
    assert "experience 1, epoch 1, iteration 1" in results["failures"][0]["error"]
    assert "PEER growth" in (run / "table.txt").read_text()


def test_the_peer_optimizer_survives_a_checkpoint_pickle():
    import io

    import dill

    from peer_ll.optim import SparseAdamW

    layer = torch.nn.Linear(3, 2)
    optimizer = SparseAdamW(layer.parameters(), lr=0.1, expert_state_dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(optimizer, buffer, pickle_module=dill)
    buffer.seek(0)
    loaded = torch.load(buffer, pickle_module=dill, weights_only=False)
    assert loaded.expert_state_dtype == torch.bfloat16
    layer.weight.grad = torch.ones_like(layer.weight)
    loaded.param_groups[0]["params"] = [layer.weight]
    loaded.step()  # raised AttributeError before the optimizer kept its own attributes
    assert loaded.state[layer.weight]["exp_avg"].dtype in (torch.bfloat16, torch.float32)
