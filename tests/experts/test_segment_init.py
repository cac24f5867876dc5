"""Data-driven sub-keys of a grown segment, and retrieval from raw queries."""

import pytest
import torch

from peer_ll.experts import PEER
from peer_ll.experts.segment_init import (
    copy_nearest_experts,
    kmeans,
    kmeans_sub_keys,
    scores_of,
    search_queries,
)


def small(**kw):
    cfg = dict(num_keys=4, heads=2, topk=4, dim_key=8, query_norm="layer", backend="torch")
    cfg.update(kw)
    return PEER(16, **cfg)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 50, 2)).reshape(-1, 2)
    found = kmeans(points, 3, iters=10)
    # every true centre has a centroid within 0.1 (noise 0.1/√50 on the mean of 50 points)
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="points must be"):
        kmeans(torch.zeros(0, 2), 2)
    with pytest.raises(TypeError, match="n must be"):
        kmeans(torch.zeros(4, 2), 1.5)


def test_kmeans_sub_keys_writes_only_the_new_segment_in_place():
    layer = small(capacity=64)
    x = torch.randn(200, 16) + 3.0
    layer.grow(4, owner=1)
    before, param = layer.sub_keys.detach().clone(), layer.sub_keys
    kmeans_sub_keys(layer, layer.query(x).detach(), owner=1, norm=2.5)
    assert layer.sub_keys is param  # no Parameter replaced: optimizer state survives
    assert torch.equal(layer.sub_keys[:4], before[:4])  # old segment untouched
    new = layer.sub_keys.detach()[4:8]
    assert torch.allclose(new.norm(dim=-1), torch.full((4, 2), 2.5), atol=1e-5)
    assert torch.equal(layer.sub_keys[8:], before[8:])  # spare rows untouched


def test_kmeans_sub_keys_make_the_new_segment_win_its_data():
    layer = small(capacity=64)
    x_new = torch.randn(400, 16) * 0.3 + torch.randn(16) * 2  # a shifted domain
    layer.grow(4, owner=1)
    _, ids = layer.retrieve(x_new)
    random_share = float((layer.owners[ids] == 1).float().mean())
    norm = float(layer.sub_keys.detach()[:4].norm(dim=-1).mean()) * 2
    kmeans_sub_keys(layer, layer.query(x_new).detach(), owner=1, norm=norm)
    _, ids = layer.retrieve(x_new)
    share = float((layer.owners[ids] == 1).float().mean())
    assert share > random_share + 0.2 and share > 0.7


def test_kmeans_sub_keys_checks_before_changing_anything():
    layer = small(capacity=64)
    layer.grow(4, owner=1)
    before = layer.sub_keys.detach().clone()
    with pytest.raises(ValueError, match="owner must own the layer's last segment"):
        kmeans_sub_keys(layer, torch.randn(10, 2, 8), owner=0)
    with pytest.raises(ValueError, match=r"queries must have shape \(\.\.\., 2, 8\)"):
        kmeans_sub_keys(layer, torch.randn(10, 8), owner=1)
    with pytest.raises(ValueError, match="norm must be"):
        kmeans_sub_keys(layer, torch.randn(10, 2, 8), owner=1, norm=-1.0)
    assert torch.equal(layer.sub_keys.detach(), before)


def test_search_queries_matches_retrieve_and_scores_of_matches_it():
    layer = small(capacity=64)
    layer.grow(4, owner=1)
    x = torch.randn(30, 16)
    q = layer.query(x)
    for owners in (None, 0, 1):
        s_ref, i_ref = layer.retrieve(x, owners)
        s, i = search_queries(layer, q, owners=owners)
        assert torch.equal(i, i_ref) and torch.allclose(s, s_ref)
        assert torch.allclose(scores_of(layer, q, i), s, atol=1e-5)
    with pytest.raises(ValueError, match=r"q must have shape \(T, 2, 8\)"):
        search_queries(layer, q[:, 0])


def test_copy_nearest_experts_copies_the_old_expert_each_new_key_retrieves():
    torch.manual_seed(0)
    layer = small(capacity=64)
    with pytest.raises(ValueError, match="owner must not be the layer's only owner"):
        copy_nearest_experts(layer, owner=0)
    new = layer.grow(4, owner=1)
    before = layer.down.detach().clone()
    src = copy_nearest_experts(layer, owner=1)
    assert src.shape == (16,) and bool((src < 16).all())  # all from owner 0's segment
    left, right = layer.pool.key_rows(new)
    keys = layer.sub_keys.detach()
    q = torch.cat([keys[left, 0], keys[right, 1]], -1)[:, None].expand(-1, 2, -1)
    _, want = search_queries(layer, q.contiguous(), owners=0, k=1)
    assert torch.equal(src, want[:, 0, 0])
    assert torch.equal(layer.down[new], before[src]) and torch.equal(layer.up[new], layer.up[src])
    assert torch.equal(layer.down[:16], before[:16])  # old rows unchanged
    with pytest.raises(ValueError, match="owner must own the layer's last segment"):
        copy_nearest_experts(layer, owner=0)
