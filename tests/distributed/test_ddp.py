"""Data-parallel PEER on 2 gloo ranks: DDP with sparse expert gradients, growth, Avalanche."""

import pytest
import torch
from spawn import spawn
from workers import everything, layer_and_batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folder of one 2-rank gloo run of every scenario in ``workers.everything``."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "dense").mkdir()
    spawn(everything, str(out))
    return out


def _full_batch_grads():
    layer, x = layer_and_batch()
    layer(x[:6]).square().mean().add(layer(x[6:]).square().mean()).div(2).backward()
    return {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad)
        for n, p in layer.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-gloo", "dense-nccl-path"])
def test_two_ranks_average_the_gradient_of_the_whole_batch(runs, sparse):
    tmp_path = runs if sparse else runs / "dense"
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    reference = _full_batch_grads()
    assert set(ranks[0]) == set(reference) >= {"pool.down", "pool.up", "pool.sub_keys"}
    for name, grad in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # Float32 sums in another order: a few ulps of the largest entry.
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not ranks[0]["pool.down"][:16].any(), "frozen owner 0 got a gradient"


def test_ranks_stay_identical_through_growth_past_capacity(runs):
    tmp_path = runs
    states = [torch.load(tmp_path / f"state{r}.pt") for r in range(2)]
    assert states[0]["capacities"] == states[1]["capacities"]
    assert states[0]["capacities"][1] > 48, "the second growth should pass the capacity"
    for name, value in states[0]["state"].items():
        assert torch.equal(value, states[1]["state"][name]), name


def test_avalanche_strategy_under_distributed_helper(runs):
    tmp_path = runs
    runs = [torch.load(tmp_path / f"aval{r}.pt") for r in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["world"] == 2
    (n0, _, owners0), (n1, _, owners1) = runs[0]["sizes"]
    assert n1 == n0 + 16 and owners1 == [*owners0, 1]
    # Both experiences are evaluated; the one just trained was learned (class-incremental
    # without replay may forget the first one entirely).
    assert len(runs[0]["accuracy"][1]) == 2 and runs[0]["accuracy"][1][1][1] > 0
    # Every rank evaluates the whole of each experience (not its DistributedSampler share).
    assert runs[0]["eval_samples"] == runs[0]["test_samples"]


def test_checkpoint_of_two_ranks_loads_in_one_process(runs):
    from peer_ll.strategies.distributed import load_checkpoint

    saved = torch.load(runs / "state0.pt")["state"]
    layer, _ = layer_and_batch(capacity=48)  # 2 segments; the checkpoint holds 4, past 48 rows
    load_checkpoint(layer, str(runs / "dcp"))
    assert layer.num_segments == 4 and layer.capacity == saved["pool.down"].shape[0]
    for name, value in layer.state_dict().items():
        assert torch.equal(value, saved[name]), name
    x = torch.randn(5, 16)
    assert layer(x).shape == (5, 16)
