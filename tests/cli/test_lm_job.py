"""``peer-ll lm`` on a tiny model and small slices of the built-in domains; the example."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peer_ll.cli import lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(
        ["--tiny", "--steps-first", "30", "--steps", "15", "--no-progress", "--out", str(out)]
    )
    code = lm.main(args)
    return code, out, json.loads((out / "results.json").read_text())


def test_job_writes_a_run_folder(run):
    code, out, results = run
    assert code == 0
    assert (out / "table.txt").read_text().startswith("method")
    assert "--- grow-and-freeze" in (out / "samples.txt").read_text()
    names = results["domains"]
    assert names == list(lm.DEFAULT_DOMAINS)
    assert set(results["methods"]) >= {
        "full finetuning",
        "sparse finetuning (TF-IDF)",
        "grow-only (all experts)",
        "grow-and-freeze",
    }
    for row in results["methods"].values():
        assert len(row["R"]) == 3 and all(len(r) == 3 for r in row["R"])
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
    assert len(list((out / "checkpoints").glob("*.pt"))) == 1 + 4 * 2
    assert "goal" in results and isinstance(results["goal"]["met"], bool)


def test_frozen_methods_touch_nothing_old_and_keep_the_first_domain(run):
    _, _, results = run
    methods = results["methods"]
    for label in ("grow-only (all experts)", "grow-and-freeze"):
        assert methods[label]["changed_old_params"] == [0, 0]
        assert all(n > 0 for n in methods[label]["new_params"])
    known = methods["grow-and-freeze, domain known"]["R"]
    assert [r[0] for r in known] == [known[0][0]] * 3  # A bit for bit after B and C
    assert all(n > 0 for n in methods["full finetuning"]["changed_old_params"])
    assert methods["sparse finetuning (TF-IDF)"]["new_params"] == [0, 0]


def test_checkpoints_reload_identically_in_a_new_process(run):
    _, _, results = run
    # 3 domains × (base + 2 checkpoints × (full, sparse, grow-only) + 2 × 3 grow-and-freeze rows)
    assert results["reload"]["identical"] and results["reload"]["checked"] == 3 * (1 + 6 + 6)


def test_example_runs_tiny():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "add_domain_experts.py"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "restricted to A's experts" in out.stdout and "sample:" in out.stdout


def test_cli_runs_user_folders_as_domains(tmp_path):
    """``peer-ll lm --domains NAME=FOLDER ...``: any folder of text files is a domain."""
    from peer_ll.cli import main as cli

    words = {
        "alpha": "def f(x):\n    return x + {i}\n",
        "beta": "The {i}th topic reads well. ",
        "gamma": "LATIN LETTER {i} WITH MARK\n",
    }
    specs = []
    for name, pattern in words.items():
        folder = tmp_path / name
        folder.mkdir()
        for doc in range(12):
            (folder / f"doc{doc}.txt").write_text(
                "".join(pattern.format(i=doc * 100 + i) for i in range(60))
            )
        specs.append(f"{name}={folder}")
    out = tmp_path / "run"
    code = cli(
        [
            "lm",
            "--tiny",
            "--steps-first",
            "10",
            "--steps",
            "5",
            "--no-progress",
            "--methods",
            "full",
            "grow-and-freeze",
            "--out",
            str(out),
            "--domains",
            *specs,
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results["domains"] == ["alpha", "beta", "gamma"]
    assert set(results["methods"]) == {
        "full finetuning",
        "grow-and-freeze",
        "grow-and-freeze, domain known",
        "grow-and-freeze, all branches",
    }
    known = results["methods"]["grow-and-freeze, domain known"]["R"]
    assert known[1][0] == known[0][0] == known[2][0]
    assert results["reload"]["identical"]


def test_cli_rejects_bad_arguments_with_a_message(tmp_path, capsys):
    from peer_ll.cli import main as cli

    assert (
        cli(["lm", "--tiny", "--no-progress", "--out", str(tmp_path), "--domains", "pydoc-topics"])
        == 2
    )
    assert "peer-ll lm: error: --domains must name at least 2" in capsys.readouterr().err
    assert (
        cli(["lm", "--dim", "30", "--max-bytes", "20000", "--no-progress", "--out", str(tmp_path)])
        == 2
    )
    assert "dim must be a multiple of attn_heads=4, got 30" in capsys.readouterr().err
    assert (
        cli(
            [
                "lm",
                "--tiny",
                "--no-progress",
                "--out",
                str(tmp_path),
                "--domains",
                "a=" + str(tmp_path / "missing"),
                "pydoc-topics",
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
    assert cli(["lm", "--steps", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "argument --steps: expected an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "checkpoints").exists()


def test_experts_only_grows_nothing_but_experts(tmp_path):
    from peer_ll.models import PEERLM

    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(
        [
            "--tiny",
            "--experts-only",
            "--steps-first",
            "10",
            "--steps",
            "5",
            "--no-progress",
            "--methods",
            "grow-and-freeze",
            "--no-reload-check",
            "--out",
            str(tmp_path),
        ]
    )
    assert lm.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    known = results["methods"]["grow-and-freeze, domain known"]["R"]
    assert [r[0] for r in known] == [known[0][0]] * 3
    model = PEERLM.load(tmp_path / "checkpoints" / "grow-and-freeze-2-unicode-names.pt")
    assert model.owners == [0, 1, 2]
    names = list(model.state_dict())
    assert not any("adapter" in n or "grown" in n for n in names), names
    new = results["methods"]["grow-and-freeze"]["new_params"]
    layer = model.peer_layers[0]
    per_domain = 8**2 * (layer.down.shape[1] + layer.up.shape[1]) + layer.sub_keys[:8].numel()
    assert new == [per_domain, per_domain]
