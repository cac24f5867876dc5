"""A shared query adapter: grown owners use the base's, one search over the pool."""

import torch
from tiny_lm import TINY

from peer_ll.experts import PerOwner, QueryAdapter
from peer_ll.kernels.product_topk import product_topk
from peer_ll.models.lm import PEERLM
from peer_ll.models.transformer import LMConfig


class Counting(torch.nn.Module):
    """Counts the calls of a PerOwner query adapter."""

    def __init__(self, inner: PerOwner) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    owner_independent = property(lambda self: self.inner.owner_independent)

    def forward(self, q, owner):
        self.calls += 1
        return self.inner(q, owner)


def trained_adapter(heads: int, dim_key: int, unknown: str) -> PerOwner:
    adapter = QueryAdapter(heads, dim_key, rank=2, affine=True)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)  # not the identity
    return PerOwner(adapter, owner=0, unknown=unknown)


def test_per_owner_first_gives_every_owner_the_first_copy():
    shared = trained_adapter(2, 8, "first")
    q = torch.randn(5, 2, 8)
    assert shared.owner_independent
    assert torch.equal(shared(q, 3), shared(q, 0)) and not torch.equal(shared(q, 3), q)
    assert not trained_adapter(2, 8, "identity").owner_independent


def test_shared_adapter_is_one_search_with_the_base_query_over_the_grown_pool():
    torch.manual_seed(0)
    model = PEERLM(LMConfig(**TINY, growth="pool", shared_query_adapter=True))
    model.grow(4, owner=1)
    model.grow(4, owner=2)
    layer = model.peer_layers[0]
    assert layer.query_adapter.owners == [0]  # no adapter of their own for owners 1, 2
    counting = Counting(layer.query_adapter)
    with torch.no_grad():
        for p in counting.inner.parameters():
            p.normal_(0, 0.3)
    layer.query_adapter = counting
    x = torch.randn(7, TINY["dim"])
    scores, ids = layer.retrieve(x)
    assert counting.calls == 1  # one query transform, one search
    q = counting.inner(layer.query(x), 0)
    want = product_topk(q, layer.pool.sub_keys, layer.pool.segments, layer.topk)
    assert torch.allclose(scores, want[0], atol=1e-5) and torch.equal(ids, want[1])
    assert set(layer.owners[ids].unique().tolist()) <= {0, 1, 2}


def test_own_adapters_stay_the_default_and_shared_reloads(tmp_path):
    own = PEERLM(LMConfig(**TINY, growth="pool"))
    own.grow(4, owner=1)
    assert own.peer_layers[0].query_adapter.owners == [0, 1]
    torch.manual_seed(1)
    model = PEERLM(LMConfig(**TINY, growth="pool", shared_query_adapter=True))
    model.grow(4, owner=1)
    model.save(tmp_path / "m.pt")
    again = PEERLM.load(tmp_path / "m.pt")
    assert again.config.shared_query_adapter
    idx = torch.randint(0, 258, (2, 16))
    assert torch.equal(model.eval()(idx)[0], again.eval()(idx)[0])
