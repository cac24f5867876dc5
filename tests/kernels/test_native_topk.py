"""The C row top-k (peer_ll.kernels._native_topk) against torch.topk, and in product_topk."""

import math

import pytest
import torch
from kernel_cases import assert_no_ties, retrieval_case

from peer_ll.kernels import _native, _native_topk, reference
from peer_ll.kernels.product_topk import product_topk

needs_native = pytest.mark.skipif(_native_topk.load() is None, reason="no C compiler here")


@needs_native
@pytest.mark.parametrize(
    ("shape", "cols", "k"),
    [((63, 300), slice(0, 300), 16), ((63, 300), slice(7, 207), 16), ((5, 4, 61), None, 61),
     ((9, 33), slice(1, 2), 1), ((1, 1000), slice(0, 1000), 5), ((0, 20), None, 3)],
)  # fmt: skip
def test_row_topk_is_torch_topk(shape, cols, k):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # no ties
    if cols is not None:
        x = x[..., cols]  # a slice: rows are strided
    values, ids = _native_topk.row_topk(x, k)
    want = x.topk(k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(ids, want.indices)


@needs_native
def test_row_topk_ties_keep_the_lower_index_and_nan_ranks_first_as_in_torch():
    x = torch.tensor([[1.0, 3.0, 3.0, -math.inf, 2.0], [math.nan, 0.5, math.nan, 0.25, 1.0]])
    values, ids = _native_topk.row_topk(x, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 2, 4]]
    assert values[0].tolist() == [3.0, 3.0, 2.0] and values[1, 2] == 1.0
    assert bool(values[1, :2].isnan().all())
    want = x[1:].topk(3, dim=-1)  # torch ranks NaN first too
    assert torch.equal(want.values.isnan(), values[1:].isnan())
    assert want.indices.sort().values.tolist() == [[0, 2, 4]]
    values, ids = _native_topk.row_topk(torch.full((2, 3), math.nan), 2)
    assert ids.tolist() == [[0, 1], [0, 1]] and bool(values.isnan().all())


def test_fits_only_cpu_fp32_with_unit_stride():
    x = torch.randn(4, 8)
    assert not _native_topk.fits(x.double(), 3)
    assert not _native_topk.fits(x.T, 3)  # last dim not unit stride
    assert not _native_topk.fits(x, 9)  # k > n
    assert _native_topk.fits(x, 8) == (_native_topk.load() is not None)


@needs_native
@pytest.mark.parametrize(
    ("segments", "k", "masked"),
    [(None, 16, False), (None, 7, True), ([[0, 3, 2, 0], [3, 2, 2, 6]], 16, False),
     ([[0, 3, 2, 0], [3, 9, 7, 6], [12, 1, 1, 69], [13, 4, 6, 70]], 12, True)],
)  # fmt: skip
def test_product_topk_auto_uses_it_and_agrees(segments, k, masked):
    kw = {} if segments is None else dict(T=9, H=2, d=8, segments=segments)
    q, keys, segs = retrieval_case(**kw)
    mask = torch.rand(q.shape[0], len(segs), generator=torch.Generator().manual_seed(1)) > 0.4
    mask = mask if masked else None
    want = product_topk(q, keys, segs, k, segment_mask=mask, backend="torch")
    assert_no_ties(want[0])
    got = product_topk(q, keys, segs, k, segment_mask=mask, backend="auto")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_without_the_c_kernel_auto_is_pure_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("PEER_LL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PEER_LL_NATIVE", "0")
    _native_topk.load.cache_clear()
    try:
        assert _native_topk.load() is None and _native.build_and_load("int x;") is None
        q, keys, segs = retrieval_case()
        got = product_topk(q, keys, segs, 16, backend="auto")
    finally:
        _native_topk.load.cache_clear()
    want = reference.product_topk(q, keys, segs, 16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
