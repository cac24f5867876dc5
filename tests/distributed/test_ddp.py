"""Data-parallel PEER on 2 gloo ranks: DDP with sparse expert gradients, growth, Avalanche."""

import pytest
import torch
from spawn import spawn
from workers import avalanche_run, grads_of_halves, layer_and_batch, train_through_growth


def _full_batch_grads():
    layer, x = layer_and_batch()
    layer(x[:6]).square().mean().add(layer(x[6:]).square().mean()).div(2).backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
            for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-gloo", "dense-nccl-path"])
def test_two_ranks_average_the_gradient_of_the_whole_batch(tmp_path, sparse):
    spawn(grads_of_halves, str(tmp_path), sparse)
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    reference = _full_batch_grads()
    assert set(ranks[0]) == set(reference) >= {"pool.down", "pool.up", "pool.sub_keys"}
    for name, grad in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # Float32 sums in another order: a few ulps of the largest entry.
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not ranks[0]["pool.down"][:16].any(), "frozen owner 0 got a gradient"


def test_ranks_stay_identical_through_growth_past_capacity(tmp_path):
    spawn(train_through_growth, str(tmp_path))
    states = [torch.load(tmp_path / f"state{r}.pt") for r in range(2)]
    assert states[0]["capacities"] == states[1]["capacities"]
    assert states[0]["capacities"][1] > 48, "the second growth should pass the capacity"
    for name, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][name]), name


def test_avalanche_strategy_under_distributed_helper(tmp_path):
    spawn(avalanche_run, str(tmp_path))
    runs = [torch.load(tmp_path / f"aval{r}.pt") for r in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["world"] == 2
    (n0, _, owners0), (n1, _, owners1) = runs[0]["sizes"]
    assert n1 == n0 + 16 and owners1 == [*owners0, 1]
