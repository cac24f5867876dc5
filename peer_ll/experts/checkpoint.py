"""PEER checkpoints: checks before loading, and the keys of older layouts.

A PEER layer's state dict holds its query network, its pool (``pool.down``,
``pool.up``, ``pool.sub_keys``, ``pool.segments``, ...) and, if attached, its query
adapter. A layer loads the state dict of a layer that grew further by growing to
match (see :class:`peer_ll.experts.pool.ExpertPool`).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: Pool entries of a PEER state dict.
POOL_KEYS = ("down", "up", "sub_keys", "segments", "segment_owner", "expert_owner",
             "expert_frozen", "key_frozen")


def check_checkpoint(pool, state_dict: dict, prefix: str) -> None:
    """Raise a clear ValueError if a checkpoint's pool does not extend ``pool``; changes nothing."""
    saved, mine = state_dict.get(prefix + "segments"), pool.segments
    if saved is None:
        return
    if saved.dim() != 2 or saved.shape[1] != 4:
        raise ValueError(f"{prefix}segments must have shape (S, 4), got {tuple(saved.shape)}")
    n = len(mine)
    if len(saved) < n or not torch.equal(saved[:n].to(mine.device), mine):
        raise ValueError(
            f"checkpoint segments {saved.tolist()} do not extend this layer's "
            f"segments {mine.tolist()}: build the layer with the same constructor "
            "arguments as the one that was saved"
        )
    for name, width in {"down": pool.dim, "up": pool.dim_out}.items():
        table = state_dict.get(prefix + name)
        if table is not None and (table.dim() != 2 or table.shape[1] != width):
            raise ValueError(
                f"{prefix}{name} must have shape (rows, {width}), got {tuple(table.shape)}"
            )
    keys = state_dict.get(prefix + "sub_keys")
    if keys is not None and tuple(keys.shape[1:]) != tuple(pool.sub_keys.shape[1:]):
        raise ValueError(
            f"{prefix}sub_keys must have shape (rows, {tuple(pool.sub_keys.shape[1:])}), "
            f"got {tuple(keys.shape)}"
        )


def upgrade_checkpoint(state_dict: dict, prefix: str, *, adapter: object = None) -> None:
    """Rename, in place, the keys a PEER checkpoint had before its pool was a submodule.

    ``{prefix}down`` becomes ``{prefix}pool.down`` (and so on), ``query_adapters.{o}.``
    becomes ``query_adapter.copies.{o}.`` (a :class:`~peer_ll.experts.PerOwner`, whose
    ``owner_ids`` and ``class_mask`` buffers are filled in), and per-owner
    ``query_stats.`` (no longer part of a PEER layer) are dropped. Raises a ValueError
    if the checkpoint holds query adapters and the layer has no ``adapter`` attached to
    load them into.
    """
    adapter_owners: set[int] = set()
    for name in list(state_dict):
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is None:
            continue
        if rest in POOL_KEYS:
            state_dict[prefix + "pool." + rest] = state_dict.pop(name)
        elif rest.startswith("query_adapters."):
            owner = rest[len("query_adapters."):].split(".", 1)[0]
            if owner.isdigit():
                adapter_owners.add(int(owner))
            new = prefix + "query_adapter.copies." + rest[len("query_adapters."):]
            state_dict[new] = state_dict.pop(name)
        elif rest.startswith("query_stats."):
            logger.info("ignoring %s: a PEER layer keeps no query statistics", name)
            state_dict.pop(name)
    if adapter_owners and prefix + "query_adapter.owner_ids" not in state_dict:
        ids = sorted(adapter_owners)
        state_dict[prefix + "query_adapter.owner_ids"] = torch.tensor(ids, dtype=torch.long)
        state_dict[prefix + "query_adapter.class_mask"] = torch.ones(len(ids), 0, dtype=torch.bool)
    if adapter is None and any(k.startswith(prefix + "query_adapter.") for k in state_dict):
        raise ValueError(f"{prefix}query_adapter must be attached to load the checkpoint's "
                         "query adapters (PEER.attach_query_adapter), got None")
