"""``peer-ll lm``: arguments checked up front, an existing run folder refused unless
``--resume`` or ``--force``, and a resumed run equal to an uninterrupted one."""

import json

import pytest

from peer_ll.cli import main as cli
from peer_ll.cli.lm_args import flag_message

SMALL = ["--tiny", "--steps-first", "6", "--steps", "3", "--no-progress", "--no-reload-check",
         "--methods", "full", "grow-and-freeze"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (["--lr-first", "0"], "argument --lr-first: expected a finite number > 0, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["--max-bytes", "0"], "argument --max-bytes: expected an integer >= 1, got 0"),
        (["--threads", "-2"], "argument --threads: expected an integer >= 0, got -2"),
        (["--domains", "pydoc-topics", "klingon"], "'klingon' is neither a built-in domain"),
        (["--resume", "--force"], "--resume and --force exclude each other"),
    ],
    ids=["lr-nan", "lr-first-0", "batch-0", "max-bytes-0", "threads", "domain", "resume-force"],
)
def test_lm_rejects_bad_arguments_before_making_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli(["lm", *SMALL, *extra, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "peer-ll lm: error: " in captured.err and message in captured.err
    assert captured.out == "" and not out.exists()


def test_messages_name_flags_not_api_arguments():
    err = ValueError("domain 'x' holds too little text: raise max_bytes_per_domain or lower "
                     "block_size")  # fmt: skip
    assert flag_message(err) == ("domain 'x' holds too little text: raise --max-bytes or "
                                 "lower --block-size")  # fmt: skip


@pytest.mark.slow  # three tiny lm runs: about a minute on 2 quiet cores
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["lm", *SMALL, "--out", str(out)]
    assert cli(args) == 0
    whole = json.loads((out / "results.json").read_text())
    assert cli(args) == 2  # an existing run folder is refused
    assert "pass --resume to continue the run there or --force" in capsys.readouterr().err
    (out / "records" / "grow-and-freeze.json").unlink()  # killed during the last method
    (out / "results.json").unlink()
    (out / "checkpoints" / ".tmp-half-written.pt").write_bytes(b"\0" * 10)
    assert cli([*args, "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    for label, row in whole["methods"].items():
        assert resumed["methods"][label]["R"] == row["R"], label
    assert resumed["samples"] == whole["samples"]
    assert not list(out.rglob(".tmp-*"))
    (out / "stale.png").write_text("old")
    assert cli([*args, "--force"]) == 0
    assert not (out / "stale.png").exists()
    assert (
        json.loads((out / "results.json").read_text())["methods"].keys() == whole["methods"].keys()
    )
