"""Hypothesis fuzzing of the PEER layer's public API and of the checkpoint loaders.

Every call either works (with the documented result) or raises ValueError/TypeError
and leaves the full state (parameters, buffers, flags) exactly as it was.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer_ll.experts import PEER
from peer_ll.models import PEERLM
from peer_ll.models.transformer import LMConfig

from .conftest import state_hash

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _layer() -> PEER:
    torch.manual_seed(0)
    layer = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    layer.grow(2, owner=1)
    return layer.train()


def _calls_back(layer, call):
    before = state_hash(layer)
    try:
        return call(), True
    except (ValueError, TypeError):
        assert state_hash(layer) == before
        return None, False


ints = st.integers(-3, 4)
owner_specs = st.one_of(
    st.none(),
    ints,
    st.lists(ints, max_size=3),
    st.text(max_size=3),
    st.floats(allow_nan=True),
    st.booleans(),
    st.builds(
        lambda shape, dtype, v: torch.full(shape, v).to(dtype),
        st.lists(st.integers(0, 7), max_size=2).map(tuple),
        st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]),
        ints,
    ),
)


@FUZZ
@given(
    owners=owner_specs,
    batch=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    train=st.booleans(),
)
def test_forward(owners, batch, dtype, train):
    layer = _layer().train(train)
    x = torch.randn(batch, 8).to(dtype)
    out, ok = _calls_back(layer, lambda: layer(x, owners=owners))
    if ok:
        assert out.shape == (batch, 8) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@FUZZ
@given(k=st.one_of(st.integers(-2, 30), st.floats(0, 5)), owners=owner_specs)
def test_retrieve(k, owners):
    layer = _layer().eval()
    x = torch.randn(5, 8)
    result, ok = _calls_back(layer, lambda: layer.retrieve(x, owners, k=k))
    if ok:
        scores, ids = result
        assert ids.shape == (5, 2, k) and ids.min() >= 0 and ids.max() < layer.num_experts
        assert torch.isfinite(scores).all()


@FUZZ
@given(
    num_keys=st.one_of(st.integers(-1, 6), st.floats(0, 3), st.just(10**8)),
    owner=st.one_of(ints, st.text(max_size=2)),
    right=st.one_of(st.none(), st.integers(-1, 5)),
)
def test_grow(num_keys, owner, right):
    layer = _layer()
    n = layer.num_experts
    if num_keys == 10**8:  # 10^16 experts: refused before allocating (10^8 rows could fit)
        right = None
    ids, ok = _calls_back(layer, lambda: layer.grow(num_keys, owner=owner, num_keys_right=right))
    if ok:
        added = num_keys * (num_keys if right is None else right)
        assert ids.tolist() == list(range(n, n + added)) and layer.num_experts == n + added
        assert (layer.owners[n:] == owner).all()


@FUZZ
@given(
    owners=st.one_of(st.none(), ints, st.lists(ints, max_size=3), st.text(max_size=2)),
    keys=st.booleans(),
    query=st.booleans(),
)
def test_freeze(owners, keys, query):
    layer = _layer()
    _, ok = _calls_back(layer, lambda: layer.freeze(owners, keys=keys, query=query))
    if ok:
        assert layer.query_frozen == query and bool(layer.frozen_query) == query


def _source_state():
    torch.manual_seed(3)
    src = PEER(8, num_keys=4, heads=2, topk=4, dim_key=8)
    src.grow(3, owner=1)
    src.grow(2, owner=2)
    return src.state_dict()


SOURCE = _source_state()
ENTRIES = [
    "pool.segments",
    "pool.segment_owner",
    "pool.expert_owner",
    "pool.down",
    "pool.up",
    "pool.sub_keys",
    "pool.expert_frozen",
    "pool.key_frozen",
    "to_query.weight",
]


@FUZZ
@given(
    entry=st.sampled_from(ENTRIES),
    action=st.sampled_from(["set", "cut", "drop"]),
    index=st.integers(0, 40),
    value=st.integers(-20, 20000),
)
def test_load_state_dict(entry, action, index, value):
    sd = {k: v.clone() for k, v in SOURCE.items()}
    t = sd[entry]
    if action == "drop":
        del sd[entry]
    elif action == "cut":
        sd[entry] = t[: index % (len(t) + 1)]
    else:
        flat = t.view(-1)
        flat[index % flat.numel()] = value if t.dtype != torch.bool else bool(value % 2)
    layer = _layer()
    _, ok = _calls_back(layer, lambda: layer.load_state_dict(sd))
    if ok:  # whatever loaded is a consistent pool
        for k, v in layer.state_dict().items():
            assert torch.equal(v, sd[k]), k
        layer(torch.randn(4, 8))


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory):
    torch.manual_seed(0)
    model = PEERLM(
        LMConfig(
            block_size=8,
            dim=16,
            layers=2,
            attn_heads=2,
            peer_num_keys=4,
            peer_heads=2,
            peer_topk=2,
            peer_dim_key=8,
            adapter_rank=2,
            attention_adapter_rank=2,
        )
    )
    model.grow(2, owner=1)
    path = tmp_path_factory.mktemp("lm") / "lm.safetensors"
    model.save(path)
    return model, path.read_bytes()


@FUZZ
@given(
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
)
def test_peerlm_load(lm_file, tmp_path_factory, cut, flips):
    model, data = lm_file
    data = bytearray(data if cut is None else data[: cut % len(data)])
    for i, x in flips:
        if data:
            data[i % len(data)] ^= x
    path = tmp_path_factory.mktemp("fuzz") / "lm.safetensors"
    path.write_bytes(bytes(data))
    try:
        loaded = PEERLM.load(path)
    except ValueError:
        return
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # whatever loads is the saved model
