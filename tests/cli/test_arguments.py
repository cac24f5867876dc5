"""Every argument of ``peer-ll run``, ``report`` and ``data`` is checked up front:
``peer-ll CMD: error: ...`` on stderr naming the flag, status 2, no folder left behind."""

import json
import os
import stat
import subprocess
import sys

import pytest

from peer_ll.cli import main as cli


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield folder
    folder.chmod(stat.S_IRWXU)


RUN_CASES = [
    (["--experiences", "0"], "argument --experiences: expected an integer >= 1, got 0"),
    (["--experiences", "11"], "--experiences must be in [1, 10]"),
    (["--max-train-per-exp", "0"], "argument --max-train-per-exp: expected an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--replay-budget", "-5"], "argument --replay-budget: expected an integer >= 1, got -5"),
    (["--num-keys", "0"], "argument --num-keys: expected an integer >= 1, got 0"),
    (["--seeds", ","], "argument --seeds: expected a count N >= 1"),
    (["--seeds=-1,2"], "argument --seeds: expected a count N >= 1 or a comma-separated list"),
    (["--device", "bogus"], "--device must be a torch device like cpu or cuda:0, got 'bogus'"),
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--stream", "digits-sideways"], "--stream must be DATASET-KIND"),
    (["--strategies", "naive,magic"], "--strategies must be among"),
    (["--resume", "--force"], "--resume and --force exclude each other"),
]


@pytest.mark.parametrize(("extra", "message"), RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_run_rejects_bad_arguments(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli(["run", *extra, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "peer-ll run: error: " in captured.err and message in captured.err
    assert captured.out == "" and not out.exists()


def test_run_rejects_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli(["run", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "--device cuda: this machine has 0 CUDA device(s)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_rejects_missing_fashion_mnist(tmp_path, capsys):
    missing = tmp_path / "no-data"
    code = cli(["run", "--stream", "fashion-mnist-class", "--data-root", str(missing),
                "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "fashion-mnist IDX files" in err and str(missing) in err
    assert "--data-root" in err and not (tmp_path / "run").exists()


def test_run_rejects_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert cli(["run", "--out", str(target)]) == 2
    assert f"--out must be a folder, got the file {target}" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_run_rejects_a_read_only_out(read_only, capsys):
    assert cli(["run", "--out", str(read_only / "run")]) == 2
    assert f"the folder {read_only} is read-only" in capsys.readouterr().err
    assert not (read_only / "run").exists()


def test_errors_reach_stderr_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peer_ll", "run", "--lr", "nan", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert "peer-ll run: error: argument --lr" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("content", "message"), [
    ([1, 2], "must hold a JSON object, got a list"),
    ({"strategies": {"A": 5}}, "strategies['A'] must be an object, got int"),
    ({"strategies": {"A": {"avg_accuracy": "high", "accuracy_matrix": [[0.5]]}}},
     "strategies['A']['avg_accuracy'] must be a number or null, got 'high'"),
    ({"strategies": {"A": {"accuracy_matrix": [[0.5, 0.1]]}}},
     "strategies['A']['accuracy_matrix'] must be a square list"),
    ({"strategies": {}}, "must hold a non-empty 'strategies' object"),
], ids=["list", "summary-int", "scalar-str", "matrix-shape", "empty"])  # fmt: skip
def test_report_rejects_malformed_results(tmp_path, capsys, content, message):
    (tmp_path / "results.json").write_text(json.dumps(content))
    assert cli(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "peer-ll report: error: " in captured.err and message in captured.err
    assert captured.out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_report_rejects_json_that_does_not_parse_and_a_missing_run(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"strategies": ')
    assert cli(["report", str(tmp_path)]) == 2
    assert "is not readable JSON" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_report_rejects_plots_into_a_read_only_folder(tmp_path, read_only, capsys):
    good = {"strategies": {"A": {"accuracy_matrix": [[0.5]], "avg_accuracy": 0.5}}}
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert cli(["report", str(tmp_path), "--plots", str(read_only / "plots")]) == 2
    captured = capsys.readouterr()
    assert f"--plots {read_only / 'plots'}: the folder {read_only} is read-only" in captured.err
    assert captured.out == "" and not (read_only / "plots").exists()
    assert cli(["report", str(tmp_path), "--no-plots"]) == 0
    assert "50.0" in capsys.readouterr().out


def test_data_rejects_a_root_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "f"
    target.write_text("")
    assert cli(["data", "fetch", "mnist", "--root", str(target)]) == 2
    assert "peer-ll data: error: --root must be a folder" in capsys.readouterr().err
