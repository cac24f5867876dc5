"""examples/hf_add_experts.py runs (tiny settings) and shows what it claims."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_hf_add_experts_example_runs_tiny():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_add_experts.py"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "logits bit-identical to the old model: True" in out.stdout
    assert "reloaded logits identical: True" in out.stdout
    line = next(s for s in out.stdout.splitlines() if s.startswith("B perplexity"))
    before, experts = (float(part.split()[-1].rstrip(",")) for part in line.split(", ")[:2])
    assert experts < before  # B's experts learned B
