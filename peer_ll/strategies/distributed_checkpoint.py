"""DCP checkpoints of a (data-parallel or column-sharded) model with PEER layers.

Re-exported, with :func:`unwrap`, by :mod:`peer_ll.strategies.distributed`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from peer_ll.experts import peer_layers
from peer_ll.experts.sharded_checkpoint import global_state_dict, local_state_dict


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Save ``model``'s state with ``torch.distributed.checkpoint`` (collective when distributed).

    Replicated tensors are written once (by rank 0); the checkpoint loads with any number
    of ranks, one process without a process group included (:func:`load_checkpoint`).
    Column-sharded PEER tables (``peer_ll.experts.sharded``) are saved as ``Shard(1)``
    DTensors under the unsharded names, so they load sharded or whole.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(global_state_dict(unwrap(model)), checkpoint_id=path)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a :func:`save_checkpoint` folder into ``model`` in place, growing its pools first.

    Each PEER pool takes the checkpoint's capacity and segments before the tensors are
    read, so a model built with its first segment only loads a grown checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    model = unwrap(model)
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for name, layer in peer_layers(model).items():
        prefix = f"{name + '.' if name else ''}pool."
        shapes = {
            key[len(prefix) :]: meta[key].size
            for key in meta
            if key.startswith(prefix) and hasattr(meta[key], "size")
        }
        if "segments" not in shapes:
            raise ValueError(f"path must hold PEER layer {name!r}, got no {prefix}segments")
        layer.pool._match_checkpoint(  # storage of the checkpoint's shapes, then read into it
            {prefix + k: torch.empty(shapes[k]) for k in ("down", "sub_keys")},
            prefix,
            torch.empty(shapes["segments"], dtype=torch.long),
        )
        layer.stats.resize(layer.pool.capacity)
    state = global_state_dict(model)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(local_state_dict(state))
