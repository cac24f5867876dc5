"""PEERLM checkpoints: safetensors, a checked header and hash, refused before allocating."""

import json
import os

import pytest
import safetensors.torch
import torch

from peer_ll.models import PEERLM
from peer_ll.models.lm import CHECKPOINT_FORMAT
from peer_ll.models.lm_io import content_hash
from peer_ll.models.transformer import LMConfig

TINY = dict(
    vocab_size=258,
    block_size=16,
    dim=32,
    layers=2,
    attn_heads=2,
    peer_num_keys=4,
    peer_heads=2,
    peer_topk=2,
    peer_dim_key=8,
    adapter_rank=2,
    attention_adapter_rank=2,
)


@pytest.fixture
def saved(tmp_path):
    model = PEERLM(LMConfig(**TINY))
    model.grow(2, owner=1)
    model.freeze_old(1)
    path = tmp_path / "lm.safetensors"
    model.save(path)
    return model, path


def _rewrite(path, edit_meta=None, edit_tensors=None, rehash=False):
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if rehash:
        meta["sha256"] = content_hash(tensors, meta)
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))


def test_round_trip_keeps_weights_growth_and_frozen_flags(saved):
    model, path = saved
    assert path.read_bytes()[8:].lstrip().startswith(b"{")  # a safetensors header, no pickle
    fresh = PEERLM.load(path)
    assert fresh.owners == [0, 1] and fresh.config == model.config
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in fresh.parameters()
    ]


def _config(meta, **changes):
    data = json.loads(meta["config"])
    data.update(changes)
    meta["config"] = json.dumps(data)


BAD = {
    "empty file": (lambda p: p.write_bytes(b""), "got a file of 0 bytes"),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "whole safetensors"),
    "cut in the header": (lambda p: p.write_bytes(p.read_bytes()[:40]), "whole safetensors"),
    "a pickle": (lambda p: torch.save({"a": 1}, p), "safetensors"),
    "flipped byte": (lambda p: p.write_bytes(_flip(p.read_bytes())), "sha256"),
    "edited tensor": (
        lambda p: _rewrite(p, edit_tensors=lambda t: t["tok_emb.weight"].add_(1)),
        "sha256",
    ),
    "missing config key": (
        lambda p: _rewrite(
            p,
            lambda m: m.update(
                config=json.dumps({k: v for k, v in json.loads(m["config"]).items() if k != "dim"})
            ),
        ),
        r"none for \['dim'\]",
    ),
    "unknown config key": (lambda p: _rewrite(p, lambda m: _config(m, bogus=1)), "unknown keys"),
    "huge config": (
        lambda p: _rewrite(p, lambda m: _config(m, dim=2**20, attn_heads=1)),
        "must fit in the",
    ),
    "huge pool": (lambda p: _rewrite(p, lambda m: _config(m, peer_num_keys=2**18)), "must fit"),
    "config not json": (lambda p: _rewrite(p, lambda m: m.update(config="{nope")), "JSON"),
    "edited config": (lambda p: _rewrite(p, lambda m: _config(m, dropout=0.5)), "sha256"),
    "edited frozen list": (lambda p: _rewrite(p, lambda m: m.update(frozen="[]")), "sha256"),
    "wrong format": (lambda p: _rewrite(p, lambda m: m.update(format="1")), "PEERLM checkpoint"),
    "no config": (lambda p: _rewrite(p, lambda m: m.pop("config")), "config as JSON"),
    "missing weight": (
        lambda p: _rewrite(p, edit_tensors=lambda t: t.pop("head.weight"), rehash=True),
        "Missing key",
    ),
    "bad segments": (
        lambda p: _rewrite(
            p,
            edit_tensors=lambda t: t["blocks.1.ffn.pool.segments"].__setitem__((0, 3), 7),
            rehash=True,
        ),
        "tile the experts",
    ),
}


def _flip(data: bytes) -> bytes:
    i = len(data) - 1000
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_refused_clearly(saved, case):
    edit, message = BAD[case]
    _, path = saved
    edit(path)
    with pytest.raises(ValueError, match=message):
        PEERLM.load(path)


def test_failed_load_state_dict_changes_nothing(saved, hashed):
    model, _ = saved
    target = PEERLM(LMConfig(**TINY))
    sd = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    before = hashed(target)
    with pytest.raises(ValueError, match="Missing key"):
        target.load_state_dict(sd)
    assert hashed(target) == before and target.owners == [0]


def test_no_temp_files_are_left_and_format_is_named(saved):
    _, path = saved
    assert os.listdir(path.parent) == [path.name]
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == CHECKPOINT_FORMAT


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m.grow(0, owner=2), "num_keys must be an int >= 1"),
        (lambda m: m.grow(2, owner=1), "owner must be an int >= 2"),
        (lambda m: m.grow(10**6, owner=2), "must fit in the"),
        (lambda m: m.freeze_old(7), "owner must be one of"),
        (lambda m: m(torch.zeros(2, 4, dtype=torch.long), owners=5), "owners must be"),
        (lambda m: m(torch.zeros(2, 4)), "idx must be an integer tensor"),
        (lambda m: m(torch.zeros(2, 17, dtype=torch.long)), "idx must have 1 <= T <= 16"),
        (lambda m: m(torch.full((2, 4), 300)), r"idx must hold token ids in \[0, 258\)"),
        (lambda m: m(torch.full((2, 4), -1)), r"idx must hold token ids"),
    ],
)
def test_peerlm_calls_fail_clearly_and_change_nothing(saved, hashed, call, message):
    model, _ = saved
    before = hashed(model)
    with pytest.raises(ValueError, match=message):
        call(model)
    assert hashed(model) == before
