"""``peer-ll lm --methods grow-pool``: growth into one pool, everything old frozen."""

import argparse
import json

import pytest

from peer_ll.cli import lm
from peer_ll.cli.lm_args import peer_block_indices, peer_layers
from peer_ll.cli.lm_pool import prepare_pool
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig


def test_grow_pool_touches_nothing_old_and_reloads_identically(tmp_path):
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(
        [
            "--tiny",
            "--steps-first",
            "30",
            "--steps",
            "15",
            "--no-progress",
            "--methods",
            "grow-pool",
            "--peer-layers",
            "all",
            "--pool-centroids",
            "8",
            "--pool-centroid-noise",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert lm.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["methods"]["grow-pool (one retrieval)"]
    assert row["changed_old_params"] == [0, 0]
    assert all(n > 0 for n in row["new_params"])
    assert len(row["R"]) == 3 and all(len(r) == 3 for r in row["R"])
    assert results["reload"]["identical"]
    shares = row["diagnostics"][-1]["routing_share"]  # router mass per domain and owner
    assert len(shares) == 3
    assert results["config"]["model"]["peer_layers"] == [0, 1]  # --tiny: 2 blocks
    assert results["config"]["model"]["shared_query_adapter"] is False  # the base's config
    pool = results["config"]["methods"]["pool"]  # the flags reach grow-pool's regulariser
    assert (pool["pseudo"], pool["centroids"], pool["centroid_noise"]) == ("centroids", 8, 0.0)
    model = PEERLM.load(tmp_path / "checkpoints" / "grow-pool-2-unicode-names.pt")
    assert model.config.shared_query_adapter  # --pool-query shared (default)
    for layer in model.peer_layers:  # every PEER block grew, one query adapter each
        assert layer.owners.unique().tolist() == [0, 1, 2]
        assert layer.query_adapter.owners == [0]


def test_pool_centroid_flags_refuse_bad_values(capsys):
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    for flag, value in (("--pool-centroids", "0"), ("--pool-centroid-noise", "-1")):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, value])
        assert flag in capsys.readouterr().err


def test_peer_layers_flag():
    assert peer_block_indices(None, 4) is None
    assert peer_block_indices("all", 3) == (0, 1, 2)
    assert peer_block_indices("2,0,2", 4) == (0, 2)
    with pytest.raises(ValueError, match=r"--peer-layers must be block indices in \[0, 4\)"):
        peer_block_indices("4", 4)
    with pytest.raises(argparse.ArgumentTypeError, match="expected 'all' or block indices"):
        peer_layers("middle")


def test_prepare_pool_needs_pool_growth():
    model = PEERLM(
        LMConfig(
            dim=32,
            layers=2,
            attn_heads=2,
            block_size=32,
            peer_num_keys=8,
            peer_heads=2,
            peer_topk=4,
            peer_dim_key=16,
        )
    )
    with pytest.raises(ValueError, match="config.growth='pool'"):
        prepare_pool(model, owner=1, grow_keys=4, steps=1, new_blocks=None, old_blocks=[])
