"""Which segment a domain's queries retrieve from: pure functions on retrieved owners.

After a PEER pool grows, one top-k retrieval over the whole pool should send each
domain's queries to that domain's own segment: the old domains' queries to the old
experts (no stealing) and the new domain's to the new experts (no starving).
:func:`own_segment_share` measures it for one domain, :func:`segment_share_matrix`
for every domain against every owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _as_owner_array(retrieved: Any, name: str) -> np.ndarray:
    arr = np.asarray(retrieved.cpu() if hasattr(retrieved, "cpu") else retrieved)
    if arr.ndim < 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be a non-empty integer array (..., k) of owners, "
            f"got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr.reshape(-1, arr.shape[-1])


def own_segment_share(retrieved_owners: Any, owner: int) -> dict[str, float]:
    """How much of a domain's top-k lands on ``owner``'s experts.

    Args:
        retrieved_owners: (..., k) integer owner of every retrieved expert, one row per
            query (token and head); e.g. ``layer.owners[ids]`` for ``ids`` from
            ``layer.retrieve(x)``.
        owner: the domain's own owner id.

    Returns:
        ``{"slots": mean share of top-k slots that are ``owner``'s, "all": share of
        queries whose whole top-k is ``owner``'s, "any": share of queries with at least
        one of ``owner``'s experts}``, each in [0, 1].
    """
    arr = _as_owner_array(retrieved_owners, "retrieved_owners")
    own = arr == owner  # (Q, k)
    return {
        "slots": float(own.mean()),
        "all": float(own.all(1).mean()),
        "any": float(own.any(1).mean()),
    }


def segment_share_matrix(
    retrieved: Mapping[int, Any], owners: list[int] | None = None
) -> tuple[np.ndarray, list[int], list[int]]:
    """Share of each domain's top-k slots on each owner's experts.

    Args:
        retrieved: {domain: (..., k) owners of its retrieved experts}.
        owners: the owners, in column order (default: every owner seen, ascending).

    Returns:
        ``(M, domains, owners)``: M (len(domains), len(owners)), row d the share of
        domain d's retrieved slots owned by each owner (a row sums to 1 when ``owners``
        holds every owner retrieved).
    """
    if not isinstance(retrieved, Mapping) or not retrieved:
        raise ValueError(
            f"retrieved must be a non-empty mapping domain -> owners, "
            f"got {type(retrieved).__name__}"
        )
    arrays = {d: _as_owner_array(a, f"retrieved[{d!r}]") for d, a in retrieved.items()}
    if owners is None:
        owners = sorted({int(o) for a in arrays.values() for o in np.unique(a)})
    domains = sorted(arrays)
    M = np.array([[float((arrays[d] == o).mean()) for o in owners] for d in domains])
    return M, domains, list(owners)
