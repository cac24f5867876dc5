"""Key protection without replay: keep a new owner's sub-keys off old owners' queries.

Once every old parameter is frozen, old inputs change output only when new sub-keys
outscore old ones for old queries (routing drift). :func:`key_margin_loss` samples
pseudo-queries from the old owners' query statistics and penalises every new expert
among a pseudo-query's top-k whose score exceeds the old experts' ``rank``-th best
score minus ``margin``. With ``rank = topk`` and a zero loss (margin >= 0) no new
expert enters the top-k of those queries, so unrestricted retrieval of them is
unchanged. Per-owner query adapters are honoured: each owner's keys are scored with
its own query. Axis letters: ``P`` pseudo-queries, ``H`` heads, ``K`` top-k, ``d``
dim_key.
"""

from __future__ import annotations

import torch

from peer_ll.experts.checks import check_int, check_owner


def key_margin_loss(
    layer,
    *,
    new_owner: int,
    num_samples: int = 256,
    margin: float = 0.0,
    rank: int | None = None,
    old_owners: list[int] | None = None,
    min_var: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hinge ``relu(new − old_threshold + margin)`` on pseudo-queries of old owners.

    Gradients reach the new owner's sub-keys (and its query adapter, if any); the
    pseudo-queries and old keys carry none.

    Args:
        layer: a PEER layer with query statistics for the old owners.
        new_owner: owner whose keys must stay below the old scores.
        num_samples: pseudo-queries drawn per old owner.
        margin: how far below the old threshold the new scores must stay.
        rank: the old threshold is the ``rank``-th best old score of each pseudo-query
            (default ``layer.topk``: no new expert enters the old top-k; 1: the best).
        old_owners: owners to protect (default: every other owner with statistics).
        min_var: added to the sampled variances.
        generator: random generator for the pseudo-queries.

    Returns:
        Scalar loss: mean over pseudo-queries, heads and the new owner's top-k.
    """
    new_owner = check_owner("new_owner", new_owner)
    check_int("num_samples", num_samples, minimum=1)
    stats = getattr(layer, "query_stats", None)
    if stats is None:
        raise ValueError("layer must keep query statistics (query_stats='diag' or 'full'), "
                         "got query_stats=None")
    present = set(layer.segment_owner.tolist())
    if new_owner not in present:
        raise ValueError(f"new_owner must be among the layer's owners {sorted(present)}, "
                         f"got {new_owner}")
    if old_owners is None:
        old_owners = [o for o in stats.usable_owners() if o != new_owner and o in present]
    else:
        old_owners = sorted({check_owner("old_owners", o) for o in old_owners})
        bad = [o for o in old_owners if o == new_owner or o not in stats.usable_owners()]
        if bad:
            raise ValueError(f"old_owners must have query statistics and differ from "
                             f"new_owner={new_owner}, got {bad}")
    if not old_owners:
        return layer.sub_keys.sum() * 0.0  # nothing to protect: a zero that keeps the graph
    dtype = layer.sub_keys.dtype
    queries = torch.cat([
        stats.sample(o, num_samples, min_var=min_var, generator=generator, dtype=dtype)
        for o in old_owners
    ]).to(layer.sub_keys.device)  # (P, H, d)
    with torch.no_grad():
        old_ids = torch.tensor(old_owners, device=layer.segment_owner.device)
        segments = layer.segments[torch.isin(layer.segment_owner, old_ids)]
        held = int((segments[:, 1] * segments[:, 2]).sum())
        r = min(layer.topk if rank is None else check_int("rank", rank, minimum=1), held)
        old, _ = layer._adapted_search(queries, segments, None, r)  # (P, H, r)
        threshold = old[..., r - 1]  # (P, H)
        new_segments = layer.segments[layer.segment_owner == new_owner]
        k = min(layer.topk, int((new_segments[:, 1] * new_segments[:, 2]).sum()))
        _, ids = layer._adapted_search(queries, new_segments, None, k)  # (P, H, k)
    new = layer._owner_scores(queries, ids)  # differentiable w.r.t. the new keys
    return torch.relu(new - threshold[..., None] + margin).mean()
