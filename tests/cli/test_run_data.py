"""``peer-ll run --data FILE``: a user's own arrays, with the no-network baselines."""

import json

import numpy as np
import torch
from sklearn.datasets import load_digits

from peer_ll.cli import main as cli


def test_run_on_a_users_npz_with_the_baselines(tmp_path, capsys):
    torch.set_num_threads(1)
    digits = load_digits()
    keep = digits.target < 6
    path = tmp_path / "mine.npz"
    np.savez(path, X=digits.data[keep] / 16.0, y=digits.target[keep])  # float64, as numpy has
    out = tmp_path / "run"
    args = ["run", "--data", str(path), "--stream", "class", "--experiences", "3", "--seeds", "1",
            "--epochs", "1", "--hidden", "16", "--num-keys", "4",
            "--strategies", "slda,input-stats", "--out", str(out)]  # fmt: skip
    assert cli(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["stream"] == "mine-class" and results["config"]["n_experiences"] == 3
    stats = results["strategies"]["Input-statistics classifier"]
    assert np.shape(stats["accuracy_matrix"]) == (3, 3)
    assert stats["avg_accuracy"] > 0.85  # per-class Gaussians on 6 digit classes
    assert results["strategies"]["StreamingLDA"]["avg_accuracy"] > 0.8
    assert cli([*args[:3], "--stream", "sideways", "--out", str(tmp_path / "bad")]) == 2
    assert "--stream must be a KIND" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
