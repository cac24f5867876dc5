"""``benchmarks/routing_protection.py`` runs through the harness and reproduces its records."""

import json
import math

import numpy as np
import pytest
import torch
from bench_scripts import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("routing_protection")


def _recorded(script, stream, method, seed):
    records = script.load(BENCHMARKS / "records" / "routing_protection.jsonl")
    return next(
        r for r in records if (r["stream"], r["method"], r["seed"]) == (stream, method, seed)
    )


def test_naive_on_split_digits_reproduces_its_record(script):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = script.run_one("digits-class", "Naive", 0)
    finally:
        torch.set_num_threads(threads)
    R = np.asarray(record["R"], dtype=float)
    assert R.shape == (5, 5)
    assert np.isnan(R[np.triu_indices(5, 1)]).all()  # only seen experiences are evaluated
    stored = np.asarray(_recorded(script, "digits-class", "Naive", 0)["R"], dtype=float)
    low = np.tril_indices(5)
    # Naive forgets everything: entries are 0 or close to 1; a changed run loop would move
    # them by whole experiences, floating-point noise by less than 0.02.
    np.testing.assert_allclose(R[low], stored[low], atol=0.02)
    assert record["share"] == [[pytest.approx(1.0)]] * 5  # one owner: the fixed pool
    json.dumps(record)  # a JSON line


def test_report_marks_removed_methods(script):
    records = script.load(BENCHMARKS / "records" / "routing_protection.jsonl")
    text = script.tables(records)
    assert f"| Protect-Margin (removed, measured at {script.REMOVED_AT}) | 3 |" in text
    assert "| Protect-Input+Enc | 3 |" in text
    assert not set(script.REMOVED) & set(script.METHODS)
    assert math.isfinite(script.summary([_recorded(script, "digits-class", "Naive", 0)])["acc"][0])
