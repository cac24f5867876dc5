"""``benchmarks/lm_pool_ceiling.py``: grow-pool with replayed or generated old blocks."""

import argparse
import json
import math

import pytest
import torch
from bench_scripts import load_benchmark

from peer_ll.cli import lm
from peer_ll.models.lm import PEERLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    return load_benchmark("lm_pool_ceiling")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ceiling")
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(
        ["--tiny", "--methods", "full", "--steps-first", "20", "--steps", "6"]
        + ["--no-progress", "--no-reload-check", "--out", str(out)]
    )
    assert lm.main(args) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("old", ["real", "generated", "none"])
def test_starts_from_the_runs_base_and_reports_every_domain(script, run, old):
    out, results = run
    got = script.main(
        [str(out), "--old", old, "--step-mult", "1", "--generated", "8", "--gen-len", "40"]
    )
    base_row = results["methods"]["full finetuning"]["R"][0]
    assert got["R"][0] == pytest.approx(base_row, rel=1e-9)  # same base, same test blocks
    assert len(got["R"]) == 3 and all(len(r) == 3 for r in got["R"])
    assert got["steps"] == 6 and len(got["seconds"]) == 2
    assert got["first_change"] == pytest.approx(got["R"][2][0] / got["R"][0][0] - 1)
    assert all(math.isfinite(g) for g in got["gain_vs_full"])
    assert 0.0 <= got["first_on_base"] <= 1.0


def test_generated_blocks_are_the_models_samples_of_block_width(script, run):
    out, _ = run
    model = PEERLM.load(next((out / "checkpoints").glob("base-0-*.pt")))
    width = model.config.block_size + 1
    blocks = script.generated_blocks(model, 5, length=width + 3, temperature=1.0, seed=0)
    assert blocks.shape == (5, width)
    assert int(blocks.min()) >= 0 and int(blocks.max()) < model.config.vocab_size
    again = script.generated_blocks(model, 5, length=width + 3, temperature=1.0, seed=0)
    assert torch.equal(blocks, again)
    with pytest.raises(ValueError, match="--gen-len must be at least"):
        script.generated_blocks(model, 1, length=width - 1, temperature=1.0, seed=0)


def test_refuses_a_run_without_full_finetuning_and_a_bad_replay_share(script, run, tmp_path):
    out, results = run
    with pytest.raises(SystemExit, match="--replay must be in"):
        script.main([str(out), "--replay", "1.0"])
    (tmp_path / "results.json").write_text(json.dumps(dict(results, methods={})))
    with pytest.raises(SystemExit, match="must have method 'full'"):
        script.main([str(tmp_path)])
