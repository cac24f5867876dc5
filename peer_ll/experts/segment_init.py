"""Data-driven sub-keys for a grown segment, and retrieval from raw queries.

A freshly grown segment has random sub-keys. Against a pool whose keys were trained,
they lose every query (the grown experts starve) or, once trained without care, win
queries of other domains (they steal). :func:`kmeans_sub_keys` places a new segment's
sub-keys where the new data's queries are: its left sub-keys are the k-means centroids
of the queries' first halves, its right sub-keys those of the second halves (the
product-key memory's two codebooks, Lample et al. 2019), scaled to a chosen norm.

Axis letters: ``T`` queries, ``H`` heads, ``d`` dim_key, ``k`` top-k.
"""

from __future__ import annotations

import torch

from peer_ll.experts.checks import check_float, check_int, check_owner, check_type
from peer_ll.experts.owners import select_segments
from peer_ll.experts.peer import PEER


def kmeans(points: torch.Tensor, n: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: (P, m) points -> (n, m) centroids.

    An empty cluster takes the point farthest from its centroid. With fewer points
    than ``n`` the centroids repeat points.
    """
    check_type("points", points, torch.Tensor)
    if points.dim() != 2 or not len(points):
        raise ValueError(f"points must be a non-empty (P, m) tensor, got {tuple(points.shape)}")
    check_int("n", n, minimum=1)
    check_int("iters", iters, minimum=0)
    pts = points.detach().float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(len(pts), (1,), generator=gen))
    cent = [pts[first]]
    dist = (pts - cent[0]).pow(2).sum(1)
    for _ in range(n - 1):  # k-means++: draw the next seed in proportion to d²
        probs = dist.cpu() + 1e-12
        pick = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        cent.append(pts[pick])
        dist = torch.minimum(dist, (pts - pts[pick]).pow(2).sum(1))
    cent = torch.stack(cent)  # (n, m)
    for _ in range(iters):
        d2 = torch.cdist(pts, cent)  # (P, n)
        assign = d2.argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, pts)
        counts = torch.bincount(assign, minlength=n).to(pts.dtype)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # reseed empty clusters at the worst-served points
            worst = d2.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            cent[empty] = pts[worst]
    return cent


@torch.no_grad()
def kmeans_sub_keys(
    layer: PEER,
    queries: torch.Tensor,
    *,
    owner: int,
    norm: float | None = None,
    iters: int = 20,
    seed: int = 0,
) -> None:
    """Set the sub-keys of ``owner``'s newest segment to k-means centroids of ``queries``.

    Args:
        layer: the PEER layer; ``owner`` must own its last segment.
        queries: (..., H, d) queries of the new data (``layer.query(x)``).
        owner: owner of the segment to initialise (it must be the last one).
        norm: norm of every new sub-key (default: the mean norm of the other
            segments' sub-keys, or the centroid's own norm for a one-segment pool).
        iters: Lloyd iterations.
        seed: k-means++ seed.

    Only the new segment's sub-key rows change, in place: no Parameter is replaced.
    """
    check_type("layer", layer, PEER)
    owner = check_owner("owner", owner)
    last = int(layer.segment_owner[-1])
    if last != owner:
        raise ValueError(f"owner must own the layer's last segment ({last}), got {owner}")
    check_type("queries", queries, torch.Tensor)
    if queries.dim() < 2 or tuple(queries.shape[-2:]) != (layer.heads, layer.dim_key):
        raise ValueError(
            f"queries must have shape (..., {layer.heads}, {layer.dim_key}), "
            f"got {tuple(queries.shape)}"
        )
    if norm is not None:
        check_float("norm", norm, minimum=0.0)
    key_off, n_left, n_right, _ = layer.segments[-1].tolist()
    half = layer.dim_key // 2
    q = queries.detach().reshape(-1, layer.dim_key).float()  # heads share the keys
    if norm is None and layer.num_segments > 1:
        norm = float(layer.sub_keys.detach()[:key_off].norm(dim=-1).mean())
    new = layer.sub_keys.detach().clone()
    for side, n in ((0, n_left), (1, n_right)):
        cent = kmeans(q[:, side * half : (side + 1) * half], n, iters=iters, seed=seed + side)
        if norm is not None:
            cent = cent / cent.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
        new[key_off : key_off + n, side] = cent.to(new.dtype)
    layer.sub_keys.data.copy_(new)


def copy_nearest_experts(layer: PEER, *, owner: int) -> torch.Tensor:
    """Start the experts of ``owner``'s newest segment as copies of old experts.

    New expert e has the key (left half, right half) of its two sub-keys; used as a query
    (every head; head 0's result), it retrieves its top-1 among the other owners' experts,
    whose down and up rows e copies. Call after the new sub-keys are set (e.g. by
    :func:`kmeans_sub_keys`): a token that the new keys win then starts from an output
    near its old one instead of random experts'. Returns the (n,) ids copied from.
    """
    check_type("layer", layer, PEER)
    owner = check_owner("owner", owner)
    last = int(layer.segment_owner[-1])
    if last != owner:
        raise ValueError(f"owner must own the layer's last segment ({last}), got {owner}")
    old = sorted(set(layer.segment_owner.tolist()) - {owner})
    if not old:
        raise ValueError(f"owner must not be the layer's only owner, got {owner}")
    _, n_left, n_right, start = layer.segments[-1].tolist()
    ids = torch.arange(start, start + n_left * n_right, device=layer.sub_keys.device)
    left, right = layer.pool.key_rows(ids)
    keys = layer.sub_keys.detach()
    q = torch.cat([keys[left, 0], keys[right, 1]], -1)  # (n, d)
    q = q[:, None].expand(-1, layer.heads, -1).contiguous()  # (n, H, d)
    _, src = search_queries(layer, q, owners=old, k=1)
    src = src[:, 0, 0]
    with torch.no_grad():
        for table in (layer.pool.down, layer.pool.up):
            table[ids] = table[src]
    return src


def search_queries(
    layer: PEER, q: torch.Tensor, *, owners=None, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of raw queries, without gradient: q (T, H, d) -> scores, ids (T, H, k).

    The layer's own search (query adapters included), for queries that do not come
    from an input, e.g. pseudo-queries drawn from stored statistics.

    Args:
        layer: the PEER layer.
        q: (T, H, d) queries after the query norm.
        owners: restrict the search to these owners (an int or a sequence; None: all).
        k: number of experts (default: the layer's topk).
    """
    check_type("layer", layer, PEER)
    k = layer.topk if k is None else check_int("k", k, minimum=1)
    if q.dim() != 3 or tuple(q.shape[1:]) != (layer.heads, layer.dim_key):
        raise ValueError(
            f"q must have shape (T, {layer.heads}, {layer.dim_key}), got {tuple(q.shape)}"
        )
    segments, mask = select_segments(
        owners, layer.segments, layer.segment_owner, tuple(q.shape[:1]), need=k
    )
    with torch.no_grad():
        return layer._search(q.detach(), segments, mask, k)


def scores_of(layer: PEER, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Differentiable scores (T, H, k) of expert ``ids`` for queries q (T, H, d).

    Gradients reach q, unfrozen sub-keys and query adapters, as in the forward.
    """
    check_type("layer", layer, PEER)
    return layer._scores(q, ids)
