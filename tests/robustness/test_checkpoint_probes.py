"""A bad checkpoint is refused whole, before anything grows; a failed load changes nothing."""

import pytest
import torch

from peer_ll.experts import PEER


def _saved():
    """The state dict of a layer that grew past the capacity of a fresh one."""
    torch.manual_seed(1)
    src = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    src.grow(3, owner=1)
    src.grow(2, owner=2)
    return {k: v.clone() for k, v in src.state_dict().items()}


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])

    return edit


def _drop(key):
    return lambda sd: sd.pop(key)


def _segment(row, col, value):
    def edit(sd):
        sd["pool.segments"][row, col] = value

    return edit


BAD = {
    "segments point past the tables": (_segment(2, 3, 10000), "tile the experts"),
    "segment larger than the tables": (_segment(2, 1, 50), "inside the tables"),
    "sub-keys past the table": (_segment(2, 0, 500), "inside the tables"),
    "negative key offset": (_segment(1, 0, -3), "key_offset >= 0"),
    "empty segment": (_segment(1, 2, 0), "n_right >= 1"),
    "negative owner": (
        _set("pool.segment_owner", lambda t: torch.tensor([0, -5, 2])),
        "segment_owner must be >= 0",
    ),
    "owner of rows disagrees": (
        _set("pool.expert_owner", lambda t: t.fill_(0)),
        "expert_owner must give each expert",
    ),
    "segments of wrong width": (_set("pool.segments", lambda t: t[:, :3]), r"shape \(rows, 4\)"),
    "float segments": (_set("pool.segments", lambda t: t.float()), "int dtype"),
    "no segments": (
        lambda sd: sd.update(
            {
                "pool.segments": sd["pool.segments"][:0],
                "pool.segment_owner": sd["pool.segment_owner"][:0],
            }
        ),
        "at least one segment",
    ),
    "owners of wrong length": (_set("pool.segment_owner", lambda t: t[:2]), "must have 3 rows"),
    "up shorter than down": (_set("pool.up", lambda t: t[:-1]), "pool.up must have"),
    "down of wrong width": (_set("pool.down", lambda t: t[:, :5]), r"shape \(rows, 8\)"),
    "frozen flags missing rows": (_set("pool.expert_frozen", lambda t: t[:3]), "expert_frozen"),
    "int tables": (_set("pool.down", lambda t: t.long()), "float dtype"),
    "a pool entry missing": (_drop("pool.key_frozen"), "every pool entry"),
    "missing query weight": (_drop("to_query.weight"), "to_query.weight"),
    "query weight of wrong shape": (_set("to_query.weight", lambda t: t[:, :3]), "size mismatch"),
    "a list for a table": (_set("pool.up", lambda t: t.tolist()), "must be a torch.Tensor"),
    "other segments": (_segment(0, 1, 2), "tile the experts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_refused_and_changes_nothing(hashed, case):
    edit, message = BAD[case]
    sd = _saved()
    edit(sd)
    layer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    before = hashed(layer)
    with pytest.raises((ValueError, TypeError), match=message):
        layer.load_state_dict(sd)
    assert hashed(layer) == before
    layer(torch.randn(5, 8))  # still usable
    assert layer.num_experts == 16


def test_failed_load_into_a_model_is_undone_by_load_or_restore(hashed):
    from peer_ll.experts.checkpoint import load_or_restore

    model = torch.nn.Sequential(
        PEER(8, num_keys=4, heads=2, topk=4, dim_key=8), torch.nn.Linear(8, 2)
    )
    sd = {"0." + k: v for k, v in _saved().items()}  # no entry for the Linear: strict fails
    before = hashed(model)
    with pytest.raises(ValueError, match="Missing key"):
        load_or_restore(model, lambda: model.load_state_dict(sd))
    assert hashed(model) == before and model[0].num_experts == 16


def test_good_checkpoint_grows_and_matches():
    sd = _saved()
    layer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    layer.load_state_dict(sd)
    assert layer.num_experts == 16 + 9 + 4
    for k, v in layer.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_query_frozen_is_in_the_state_dict():
    src = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    src.freeze(0, query=True)
    dst = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    dst.load_state_dict(src.state_dict())
    assert dst.query_frozen
    assert not any(p.requires_grad for p in dst.to_query.parameters())
    assert not any(p.requires_grad for p in dst.query_norm.parameters())
    dst.train()
    running = dst.query_norm.running_mean.clone()
    dst(torch.randn(5, 8))  # frozen query: BatchNorm keeps its running statistics
    assert torch.equal(dst.query_norm.running_mean, running)
    dst.unfreeze(query=True)
    src2 = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    src2.load_state_dict(dst.state_dict())
    assert not src2.query_frozen


def test_checkpoint_without_the_query_flag_still_loads():
    sd = _saved()
    sd.pop("frozen_query")
    layer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    layer.load_state_dict(sd)
    assert not layer.query_frozen and layer.num_experts == 29
