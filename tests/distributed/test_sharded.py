"""Column-sharded PEER tables on 2 gloo ranks against the unsharded layer in one process.

Tolerances: the sharded layer sums each expert's dot product as two half-dots plus an
all-reduce, and sums gradients in another order, so float32 results differ from the
unsharded layer's by rounding only: a few ulps (rtol 1e-5, atol 1e-6). After 12 AdamW
steps those differences pass through Adam's division by sqrt(v), hence rtol 1e-4 there.
"""

import pytest
import torch
from sharded_workers import SMALL, SPLIT, chunks, everything, layer_and_batch, reference_loss
from spawn import spawn

from peer_ll.experts import PEER
from peer_ll.experts.sharded import shard_columns
from peer_ll.strategies.distributed import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folder of one 2-rank gloo run of every scenario in ``sharded_workers``."""
    out = tmp_path_factory.mktemp("sharded")
    whole, _ = layer_and_batch()
    for owner in (2, 3, 4):
        whole.grow(4, owner=owner)  # past capacity 32
    save_checkpoint(whole, str(out / "dcp1"))  # one process, no process group
    torch.save(whole.state_dict(), out / "whole1.pt")
    spawn(everything, str(out))
    return out


def test_forward_and_backward_equal_the_unsharded_layer(runs):
    layer, x = layer_and_batch()
    reference_loss(layer, x).backward()
    ys = [layer(c).detach() for c in chunks(x)]
    grads = {
        n: p.grad.to_dense() if p.grad.is_sparse else p.grad
        for n, p in layer.named_parameters()
        if p.grad is not None
    }
    for rank in range(2):
        got = torch.load(runs / f"fb{rank}.pt")
        torch.testing.assert_close(got["y"], ys[rank], rtol=1e-5, atol=1e-6)
        assert got["sizes"] == ((32, 8), (32, 6)), "each rank holds half the columns"
        assert set(got["grads"]) == set(grads)
        down_cols, up_cols = (slice(*c) for c in got["columns"])
        for name, grad in grads.items():
            cols = {"pool.down": down_cols, "pool.up": up_cols}.get(name, slice(None))
            want = grad[:, cols] if grad.dim() == 2 else grad
            torch.testing.assert_close(got["grads"][name], want, rtol=1e-5, atol=1e-6, msg=name)
        assert not got["grads"]["pool.down"][:16].any(), "frozen owner 0 got a gradient"
        assert got["traffic"]["all_to_all"] > 0 and got["traffic"]["all_reduce"] > 0


def test_owners_empty_ranks_and_batch_norm(runs):
    layer, x = layer_and_batch()
    alone = layer(chunks(x)[1])
    alone.square().sum().backward()
    torch.manual_seed(0)
    batch = PEER(16, **{**SMALL, "query_norm": "batch"})
    for rank, mine in enumerate(chunks(x)):
        got = torch.load(runs / f"edge{rank}.pt")
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["owned"], layer(mine, owners=1).detach(), **close)
        per_input = layer(mine, owners=torch.arange(len(mine)) % 2).detach()
        torch.testing.assert_close(got["per_input"], per_input, **close)
        # BatchNorm statistics are each rank's own, as under DDP.
        torch.testing.assert_close(got["normed"], batch(mine).detach(), **close)
        torch.testing.assert_close(got["in_group"], layer(mine).detach(), **close)
        assert got["alone"].shape == ((0, 12) if rank == 0 else (7, 12))
        if rank:
            torch.testing.assert_close(got["alone"], alone.detach(), **close)
        # One rank's tokens only: its loss's gradient, exactly as one process, halved
        # (DDP's mean over ranks, one of which contributes nothing).
        cols = slice(6 * rank, 6 * rank + 6)
        want = layer.pool.up.grad.to_dense()[:, cols] / 2
        torch.testing.assert_close(got["alone_grad"], want, **close)


def test_growth_and_training_equal_the_unsharded_layer(runs):
    for rank in range(2):
        got = torch.load(runs / f"train{rank}.pt")
        assert got["capacity"] > 48, "the second growth should pass the capacity"
        assert got["whole"].keys() == got["ref"].keys()
        for name, value in got["ref"].items():
            torch.testing.assert_close(got["whole"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        (down0, up0), (down1, up1) = got["frozen"]
        assert torch.equal(down0, down1) and torch.equal(up0, up1), "frozen rows changed"


def test_optimizer_updates_only_local_rows_that_were_retrieved(runs):
    for rank in range(2):
        first = torch.load(runs / f"train{rank}.pt")["first"]
        assert first["moment_shape"] == (48, 8), "moments of the local block only"
        retrieved = set(first["retrieved"].tolist()) - set(range(16))  # owner 0 is frozen
        assert set(first["changed"].tolist()) == retrieved
        assert set(first["moment_rows"].tolist()) == retrieved


def test_two_rank_checkpoint_loads_in_one_process(runs):
    saved = torch.load(runs / "train0.pt")["whole"]
    layer, _ = layer_and_batch()
    load_checkpoint(layer, str(runs / "dcp2"))
    assert layer.capacity == saved["pool.down"].shape[0] > 48
    for name, value in layer.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert layer(torch.randn(3, 16)).shape == (3, 12)


@pytest.mark.parametrize("saved_by", ["dcp1", "dcp2"], ids=["one-process", "two-ranks"])
def test_checkpoint_loads_sharded_over_two_ranks(runs, saved_by):
    if saved_by == "dcp1":
        saved = torch.load(runs / "whole1.pt")
    else:
        saved = torch.load(runs / "train0.pt")["whole"]
    for rank in range(2):
        loaded = torch.load(runs / f"{saved_by}-loaded{rank}.pt")
        assert loaded.keys() == saved.keys()
        for name, value in saved.items():
            assert torch.equal(loaded[name], value), name


def test_bad_arguments_raise_before_anything_changes(runs):
    assert torch.load(runs / "error0.pt") == (
        f"layer.dim must be a multiple of the {len(SPLIT)} ranks to split columns, got 15"
    )
    layer, _ = layer_and_batch()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="torch.distributed must be initialized"):
        shard_columns(layer)  # this process has no process group
    with pytest.raises(TypeError, match="layer must be a PEER"):
        shard_columns(torch.nn.Linear(4, 4))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_avalanche_strategy_with_sharded_tables_equals_plain_ddp(runs):
    for rank in range(2):
        plain, sharded = (torch.load(runs / f"aval{rank}.pt")[shard] for shard in (False, True))
        assert (plain["type"], sharded["type"]) == ("PEER", "ShardedPEER")
        assert sharded["down"][1] * 2 == plain["down"][1] == 16, "half the columns per rank"
        assert sharded["owners"] == plain["owners"] == [0, 1], "grown once, on both ranks"
        assert sharded["state"].keys() == plain["state"].keys()
        for name, value in plain["state"].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(sharded["state"][name], value, rtol=1e-4, atol=1e-5)
            else:  # the growth module's record; fingerprints are of each rank's block
                mine = {k: v for k, v in sharded["state"][name].items() if k != "fingerprints"}
                assert mine == {k: v for k, v in value.items() if k != "fingerprints"}, name
        torch.testing.assert_close(sharded["logits"], plain["logits"], rtol=1e-4, atol=1e-4)
