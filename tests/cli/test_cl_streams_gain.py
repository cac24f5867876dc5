"""benchmarks/cl_streams.py: the sentence that says what the PEER pool adds."""

from bench_scripts import load_benchmark


def _script():
    return load_benchmark("cl_streams")


def test_pool_gain_names_the_best_baseline_and_the_sign():
    script = _script()
    acc = {
        "PEER protect (full)": 0.816,
        "StreamingLDA": 0.803,
        "Input-statistics classifier": 0.817,
        "Protect (full), per-owner MLP": 0.8155,
    }
    results = {"strategies": {k: {"avg_accuracy": v} for k, v in acc.items()}}
    text = script.pool_gain(results)
    assert text == (
        "PEER protect (full) 81.6 %: the PEER pool loses 0.1 points to the best "
        "replay-free baseline without a pool, Input-statistics classifier (81.7 %)."
    )
    results["strategies"]["PEER protect (full)"]["avg_accuracy"] = 0.85
    assert "adds 3.3 points over the best" in script.pool_gain(results)
    assert script.gaps_table(results) == ""  # no Naive/EWC/LwF/Replay/Joint rows
    assert script.pool_gain({"strategies": {"Naive": {"avg_accuracy": 0.2}}}) == ""
