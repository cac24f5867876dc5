"""``peer-ll run --nproc``: options handed to torchrun, rank settings from its environment."""

import argparse
import json

import pytest

from peer_ll.cli import distributed, main


def test_without_nproc_drops_both_spellings():
    argv = ["--seeds", "1", "--nproc", "2", "--nproc=3", "--out", "x"]
    assert distributed.without_nproc(argv) == ["--seeds", "1", "--out", "x"]


def test_single_process_settings(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init(0, "cpu") is False
    assert distributed.local_device("cuda") == "cuda"


def test_torchrun_settings(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world_size() == 4 and not distributed.is_main()
    assert distributed.local_device("cuda") == "cuda:1"
    assert distributed.local_device("cpu") == "cpu"


def test_nproc_below_one_is_refused(capsys):
    assert main(["run", "--nproc", "0", "--strategies", "naive"]) == 2
    assert "--nproc: expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_run_writes_one_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--nproc",
            "2",
            "--strategies",
            "peer-grow-noreplay",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--experiences",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["processes"] == 2
    (summary,) = results["strategies"].values()
    assert len(summary["accuracy_matrix"]) == 2


def test_batch_size_must_split_over_the_processes(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--nproc", "2", "--batch-size", "33", "--strategies", "naive", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be a multiple of --nproc 2" in err and "got 33" in err
    assert not out.exists()


@pytest.mark.parametrize("seeds", [[0], [3], [1, 2]])
def test_relaunched_processes_get_the_same_seeds(seeds, tmp_path):
    from peer_ll.cli.args import seed_list
    from peer_ll.cli.run_args import relaunch_flags

    args = argparse.Namespace(seeds=seeds, run_dir=tmp_path, out=None, nproc=2, epochs=1)
    flags = relaunch_flags(args)
    assert seed_list(flags[flags.index("--seeds") + 1]) == seeds
    assert "--nproc" not in flags and flags[flags.index("--epochs") + 1] == "1"


def test_a_model_without_peer_layers_has_no_expert_tables_to_keep_out_of_ddp():
    from torch import nn

    from peer_ll.experts import PEER
    from peer_ll.strategies.distributed import expert_table_names

    assert expert_table_names(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) == []
    model = nn.Sequential(nn.Linear(4, 4), PEER(4, num_keys=2, heads=1, topk=2, dim_key=4))
    assert expert_table_names(model) == ["1.pool.down", "1.pool.sub_keys", "1.pool.up"]


def test_shard_experts_needs_several_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--shard-experts", "--strategies", "naive", "--out", str(out)]) == 2
    assert "--shard-experts needs several processes" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_sharded_run_gives_the_data_parallel_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--nproc", "2", "--strategies", "peer-grow", "--seeds", "1", "--epochs", "1",
              "--experiences", "2"]  # fmt: skip
    assert main(["run", *common, "--out", str(tmp_path / "dp")]) == 0
    assert main(["run", *common, "--shard-experts", "--out", str(tmp_path / "sh")]) == 0
    dp, sh = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("dp", "sh"))
    (a,), (b,) = dp["strategies"].values(), sh["strategies"].values()
    flat = [[v for row in r["accuracy_matrix"] for v in row] for r in (a, b)]
    # The sharded forward equals the whole one up to float summation order: at most one
    # test sample (of about 180 per experience) may flip.
    assert flat[1] == pytest.approx(flat[0], abs=0.01)
