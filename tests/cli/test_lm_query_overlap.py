"""``benchmarks/lm_query_overlap.py``: the input probe tells apart what differs, only that."""

import pytest
import torch
from bench_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    return load_benchmark("lm_query_overlap")


def test_running_mean_is_the_causal_mean_of_the_context(script):
    x = torch.randn(2, 5, 3)
    out = script.with_running_mean(x)
    assert out.shape == (2, 5, 6)
    assert torch.equal(out[..., :3], x)
    assert torch.allclose(out[:, 3, 3:], x[:, :4].mean(1))


def test_probe_separates_shifted_domains_and_not_identical_ones(script):
    gen = torch.Generator().manual_seed(0)

    def draw(shift):  # (N, T, F) fit and test features
        return tuple(torch.randn(8, 40, 4, generator=gen) + shift for _ in range(2))

    apart = script.probe_accuracy([draw(0.0), draw(torch.tensor([3.0, 0, 0, 0]))], steps=300)
    same = script.probe_accuracy([draw(0.0), draw(0.0)], steps=300)
    assert min(apart) > 0.9
    assert max(same) < 0.6
