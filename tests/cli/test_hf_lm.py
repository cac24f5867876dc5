"""``peer-ll lm --base hf-gpt2``: a tiny run of the PEER-vs-LoRA-vs-full comparison."""

import json

import pytest

pytest.importorskip("peft")


def test_hf_gpt2_base_runs_every_method_and_checks_identity(tmp_path):
    from peer_ll.cli import main as cli

    out = tmp_path / "run"
    code = cli(
        [
            "lm",
            "--base",
            "hf-gpt2",
            "--tiny",
            "--steps-first",
            "10",
            "--steps",
            "4",
            "--domains",
            "python-stdlib",
            "pydoc-topics",
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results["domains"] == ["python-stdlib", "pydoc-topics"]
    rows = results["rows"]
    rank = results["lora_rank"]
    peer = "PEER experts + attention r=16"
    assert set(rows) == {
        "full finetuning",
        f"{peer}, domain known",
        f"{peer}, domain inferred",
        "PEER experts only, domain known",
        "PEER experts only, domain inferred",
        f"LoRA r={rank}, domain known",
        f"LoRA r={rank}, domain inferred",
        f"LoRA r={rank}, last adapter on",
    }
    assert results["base_bit_identical"]
    assert results["reload"]["identical"], results["reload"]
    assert rows[f"{peer}, domain known"]["base_change"] == 0.0
    assert rows["PEER experts only, domain known"]["base_change"] == 0.0
    assert rows[f"LoRA r={rank}, domain known"]["base_change"] == 0.0
    assert rows["full finetuning"]["gain_vs_full"] == [1.0]
    peer_count = rows[f"{peer}, domain known"]["trainable_per_domain"][0]
    lora = rows[f"LoRA r={rank}, domain known"]["trainable_per_domain"][0]
    per_rank = lora / rank  # the rank is the closest match to PEER's trainable count
    assert abs(lora - peer_count) <= per_rank / 2
    assert f"{peer}, domain inferred" in (out / "table.txt").read_text()
