"""PEER checkpoints: checks before loading, and the keys of older layouts.

A PEER layer's state dict holds its query network, its pool (``pool.down``,
``pool.up``, ``pool.sub_keys``, ``pool.segments``, ...) and, if attached, its query
adapter. A layer loads the state dict of a layer that grew further by growing to
match (see :class:`peer_ll.experts.pool.ExpertPool`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from peer_ll.experts.query_adapter import sync_adapter

logger = logging.getLogger(__name__)

#: Pool entries of a PEER state dict.
POOL_KEYS = (
    "down",
    "up",
    "sub_keys",
    "segments",
    "segment_owner",
    "expert_owner",
    "expert_frozen",
    "key_frozen",
)


def check_checkpoint(pool, state_dict: dict, prefix: str) -> None:
    """Raise a clear ValueError unless a checkpoint's pool is whole and extends ``pool``.

    Checks everything a load would use, before anything grows or is replaced: every
    pool entry present, tensors of the right dtypes and shapes, segments that tile the
    experts and lie inside the tables, owners >= 0 that match their segments, and
    tables that fit in memory. Changes nothing.
    """
    saved = state_dict.get(prefix + "segments")
    if saved is None:
        return
    entry = {name: state_dict.get(prefix + name) for name in POOL_KEYS}
    missing = [prefix + n for n, v in entry.items() if v is None]
    if missing:
        raise ValueError(f"checkpoint must hold every pool entry, got none for {missing}")
    for name, value in entry.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(value).__name__}")
        want = {
            "segments": "int",
            "segment_owner": "int",
            "expert_owner": "int",
            "expert_frozen": "bool",
            "key_frozen": "bool",
        }.get(name, "float")
        kind = (
            "bool"
            if value.dtype == torch.bool
            else "float"
            if value.is_floating_point()
            else "complex"
            if value.is_complex()
            else "int"
        )
        if kind != want:
            raise ValueError(f"{prefix}{name} must have a {want} dtype, got {value.dtype}")
    rows, keys = _check_tables(pool, entry, prefix)
    _check_segments(entry, prefix, rows, keys)
    mine = pool.segments
    n = len(mine)
    if len(saved) < n or not torch.equal(saved[:n].to(mine.device), mine):
        raise ValueError(
            f"checkpoint segments {saved.tolist()} do not extend this layer's "
            f"segments {mine.tolist()}: build the layer with the same constructor "
            "arguments as the one that was saved"
        )
    if rows > pool.capacity or keys > pool.key_capacity:
        pool.check_room(max(rows, pool.capacity), max(keys, pool.key_capacity), "checkpoint")


def _check_tables(pool, entry: dict, prefix: str) -> tuple[int, int]:
    """(expert rows, sub-key rows) of a checkpoint's tables, after checking their shapes."""
    shapes = {
        "down": (None, pool.dim),
        "up": (None, pool.dim_out),
        "sub_keys": (None, *pool.sub_keys.shape[1:]),
        "expert_owner": (None,),
        "expert_frozen": (None,),
        "key_frozen": (None,),
        "segments": (None, 4),
        "segment_owner": (None,),
    }
    for name, shape in shapes.items():
        got = tuple(entry[name].shape)
        if len(got) != len(shape) or any(
            w is not None and g != w for g, w in zip(got, shape, strict=False)
        ):
            want = ", ".join("rows" if w is None else str(w) for w in shape)
            raise ValueError(f"{prefix}{name} must have shape ({want}), got {got}")
    rows, keys = entry["down"].shape[0], entry["sub_keys"].shape[0]
    for name, size in (
        ("up", rows),
        ("expert_owner", rows),
        ("expert_frozen", rows),
        ("key_frozen", keys),
        ("segment_owner", len(entry["segments"])),
    ):
        if entry[name].shape[0] != size:
            raise ValueError(f"{prefix}{name} must have {size} rows, got {entry[name].shape[0]}")
    return rows, keys


def _check_segments(entry: dict, prefix: str, rows: int, keys: int) -> None:
    """Segments tile experts 0..N-1 in order, inside the tables; owners are >= 0."""
    seg = entry["segments"].cpu()
    if len(seg) == 0:
        raise ValueError(f"{prefix}segments must hold at least one segment, got none")
    key_off, n_left, n_right, start = seg.unbind(1)
    sizes = n_left * n_right
    expected = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    if (
        (key_off < 0).any()
        or (n_left < 1).any()
        or (n_right < 1).any()
        or not torch.equal(start, expected)
    ):
        raise ValueError(
            f"{prefix}segments must be [key_offset >= 0, n_left >= 1, n_right >= 1,"
            f" expert_offset] rows that tile the experts, got {seg.tolist()}"
        )
    used, key_end = int(sizes.sum()), int((key_off + torch.maximum(n_left, n_right)).max())
    if used > rows or key_end > keys:
        raise ValueError(
            f"{prefix}segments must lie inside the tables ({rows} expert rows, "
            f"{keys} sub-key rows), got segments using {used} and {key_end}"
        )
    owner = entry["segment_owner"].cpu()
    if (owner < 0).any():
        raise ValueError(f"{prefix}segment_owner must be >= 0, got {owner.tolist()}")
    if not torch.equal(entry["expert_owner"].cpu()[:used], owner.repeat_interleave(sizes)):
        raise ValueError(
            f"{prefix}expert_owner must give each expert its segment's owner "
            f"{owner.tolist()}, got other owners"
        )


def prepare_checkpoint(layer: nn.Module, state_dict: dict, prefix: str, strict: bool) -> None:
    """Upgrade and check a PEER ``layer``'s part of ``state_dict`` before it loads.

    Older checkpoints get their keys renamed and keep the layer's query flag; the pool
    is checked whole (:func:`check_checkpoint`) and, for a strict load, every entry of
    the layer's own entries (query network, norm, pool; not those of its query adapter
    or attached submodules, which check themselves) must be present.
    """
    if prefix + "frozen_query" not in state_dict:  # older checkpoints: keep the flag
        state_dict[prefix + "frozen_query"] = layer.frozen_query.clone()
    upgrade_checkpoint(state_dict, prefix, adapter=layer.query_adapter)
    check_checkpoint(layer.pool, state_dict, prefix + "pool.")
    if strict:
        own = [
            prefix + k
            for k in layer.state_dict()
            if k.startswith(("to_query.", "query_norm.", "pool.", "frozen_query"))
        ]
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict must hold every entry of the layer, got none for {missing}"
            )


def load_or_restore(module: nn.Module, load: Callable[[], object]) -> object:
    """Run ``load()`` (a state-dict load into ``module``); if it fails, undo it and raise.

    Every submodule's attributes, parameters, buffers and their values, and every
    ``requires_grad`` flag are put back exactly as they were (this keeps one copy of
    the state until the load ends). A torch ``RuntimeError`` (missing or unexpected
    keys, size mismatches) becomes a ValueError.
    """
    mods = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in module.modules()
    ]
    tensors = {
        id(t): t
        for m, *_ in mods
        for t in [*m._parameters.values(), *m._buffers.values()]
        if t is not None
    }
    values = [(t, t.detach().clone(), t.requires_grad) for t in tensors.values()]
    try:
        return load()
    except BaseException as error:
        for m, attrs, params, buffers, children in mods:
            m.__dict__.clear()
            m.__dict__.update(attrs, _parameters=params, _buffers=buffers, _modules=children)
        with torch.no_grad():
            for t, value, grad in values:
                if t.shape == value.shape:
                    t.copy_(value)
                t.requires_grad_(grad)
                t.__dict__.pop("peer_replaced", None)  # it was not replaced after all
        if isinstance(error, RuntimeError):
            raise ValueError(f"state_dict must match the model: {error}") from error
        raise


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
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        if rest is None:
            continue
        if rest in POOL_KEYS:
            state_dict[prefix + "pool." + rest] = state_dict.pop(name)
        elif rest.startswith("query_adapters."):
            owner = rest[len("query_adapters.") :].split(".", 1)[0]
            if owner.isdigit():
                adapter_owners.add(int(owner))
            new = prefix + "query_adapter.copies." + rest[len("query_adapters.") :]
            state_dict[new] = state_dict.pop(name)
        elif rest.startswith("query_stats."):
            logger.info("ignoring %s: a PEER layer keeps no query statistics", name)
            state_dict.pop(name)
    if adapter_owners and prefix + "query_adapter.owner_ids" not in state_dict:
        ids = sorted(adapter_owners)
        state_dict[prefix + "query_adapter.owner_ids"] = torch.tensor(ids, dtype=torch.long)
        state_dict[prefix + "query_adapter.class_mask"] = torch.ones(len(ids), 0, dtype=torch.bool)
    if adapter is None and any(k.startswith(prefix + "query_adapter.") for k in state_dict):
        raise ValueError(
            f"{prefix}query_adapter must be attached to load the checkpoint's "
            "query adapters (PEER.attach_query_adapter), got None"
        )


def after_load(layer: nn.Module, incompatible: object) -> None:
    """A PEER layer's load post-hook: resize its statistics, restore its query flag."""
    layer.stats.resize(layer.pool.capacity)
    if bool(layer.frozen_query) != layer.query_frozen:
        layer._freeze_query(bool(layer.frozen_query))
    sync_adapter(layer.query_adapter, layer.pool)
