"""Checkpoints of column-sharded PEER layers with ``torch.distributed.checkpoint``.

:func:`global_state_dict` names every tensor as the unsharded model does and gives each
local ``down``/``up`` block as a ``DTensor`` with a ``Shard(1)`` placement on a 1-D
``DeviceMesh`` of the layer's group. DCP then saves one file per rank and reshards at
load: a checkpoint saved by W ranks loads into an unsharded model in one process, into a
model sharded over W' ranks, and an unsharded one loads into a sharded model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from peer_ll.experts.sharded import SHARDED_TABLES, ShardedPEER


def _mesh(layer: ShardedPEER):
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.group.WORLD if layer.group is None else layer.group
    return DeviceMesh.from_group(group, layer.pool.down.device.type)


def sharded_layers(model: nn.Module) -> dict[str, ShardedPEER]:
    """Every :class:`ShardedPEER` inside ``model`` (itself included), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ShardedPEER)}


def global_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with each sharded table as a ``Shard(1)`` DTensor.

    The DTensors share storage with the local blocks, so ``dcp.load`` into this
    dictionary writes the layer's tables in place.
    """
    from torch.distributed.tensor import DTensor, Shard

    state = model.state_dict()
    for name, layer in sharded_layers(model).items():
        mesh = _mesh(layer)
        pool = layer.pool
        for table, width in zip(SHARDED_TABLES, (pool.full_dim, pool.full_dim_out), strict=True):
            key = f"{name + '.' if name else ''}pool.{table}"
            local = state[key]
            state[key] = DTensor.from_local(
                local,
                mesh,
                [Shard(1)],
                run_check=False,
                shape=torch.Size((local.shape[0], width)),
                stride=(width, 1),
            )
    return state


def local_state_dict(state: dict) -> dict:
    """``state`` with every DTensor replaced by its local tensor (for ``load_state_dict``)."""
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
