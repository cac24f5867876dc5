"""PEER with column-sharded expert tables, for pools larger than one device.

As in "Memory Layers at Scale" (Berges et al. 2024), the expert tables are split by
columns: rank ``r`` of ``W`` holds ``down[:, D-block r]`` and ``up[:, E-block r]`` of
every row, so each rank stores 1/W of the tables. The query network and the product
sub-keys stay replicated, so retrieval (ids and gates) is the unsharded layer's, exactly;
the expert dot products are summed over shards with one all-reduce of T·H·K scalars
(:mod:`peer_ll.experts.sharded_ops`). Growth appends the new rows' column block on every
rank (no resharding); frozen rows and owners work per shard as in :class:`PEER`.

Use under ``torch.distributed`` (every rank of the group calls every method that
changes the pool, at the same moment, as with DDP). With DDP for the rest of the
model, the local ``down``/``up`` blocks must stay out of DDP and out of the expert
gradient all-reduce: :func:`peer_ll.strategies.distributed.wrap_ddp` and
``all_reduce_expert_grads`` skip tables for which :func:`is_column_shard` is true.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from peer_ll.experts.checkpoint import after_load
from peer_ll.experts.checks import check_type
from peer_ll.experts.owners import Owners
from peer_ll.experts.peer import PEER
from peer_ll.experts.pool import ExpertPool
from peer_ll.experts.sharded_ops import sharded_mix, token_counts

SHARDED_TABLES = ("down", "up")


def is_column_shard(table: torch.Tensor) -> bool:
    """Whether ``table`` is one rank's column block of a sharded ``down`` or ``up``."""
    return getattr(table, "peer_column_shard", None) is not None


def _src(group) -> int:
    """Global rank of ``group``'s rank 0."""
    return 0 if group is None else dist.get_global_rank(group, 0)


class _SharedGroup:
    """``copy.deepcopy`` shares the process group (it cannot be copied) and copies the rest."""

    def __deepcopy__(self, memo):
        memo.setdefault(id(self.group), self.group)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


class ShardedPool(_SharedGroup, ExpertPool):
    """An :class:`ExpertPool` holding one column block of ``down`` and ``up``.

    ``dim``/``dim_out`` are the block's widths (D/W, E/W); ``full_dim``/``full_dim_out``
    the layer's. Sub-keys, segments, owners and frozen masks are whole (replicated).

    Args:
        pool: the whole pool to take this rank's block from (equal on every rank).
        rank: this process's rank in ``group``.
        world: ranks W in ``group``.
        group: the process group (None: the world).
    """

    rank, world, group = 0, 1, None  # set before ExpertPool.__init__'s first tag()

    def __init__(self, pool: ExpertPool, rank: int, world: int, group=None) -> None:
        d, e = pool.dim // world, pool.dim_out // world
        self.__dict__.update(rank=rank, world=world, group=group)
        super().__init__(
            d,
            e,
            pool.dim_key,
            heads=pool.heads,
            capacity=pool.capacity,
            key_capacity=pool.key_capacity,
        )
        self.full_dim, self.full_dim_out = pool.dim, pool.dim_out
        with torch.no_grad():
            self.down.copy_(pool.down[:, rank * d : (rank + 1) * d])
            self.up.copy_(pool.up[:, rank * e : (rank + 1) * e])
            self.sub_keys.copy_(pool.sub_keys)
        for name in ("down", "up", "sub_keys"):
            getattr(self, name).requires_grad_(getattr(pool, name).requires_grad)
        for name in ("segments", "segment_owner", "expert_owner", "expert_frozen", "key_frozen"):
            setattr(self, name, getattr(pool, name).clone())
        self.to(pool.down.device, pool.down.dtype)
        self.tag()

    def columns(self, table: str) -> slice:
        """This rank's columns of the whole ``table`` ("down" or "up")."""
        width = self.dim if table == "down" else self.dim_out
        return slice(self.rank * width, (self.rank + 1) * width)

    def tag(self) -> None:
        """Also mark ``down``/``up`` as column blocks (rank, world) after any reallocation."""
        super().tag()
        for name in SHARDED_TABLES:
            getattr(self, name).peer_column_shard = (self.rank, self.world)

    def _initial_rows(self, n: int, n_keys: int, dim=None, dim_out=None, out=None) -> tuple:
        """:meth:`ExpertPool._initial_rows` of whole rows (the same draws as an unsharded
        pool), broadcast from the group's rank 0 so every shard agrees, cut to this block
        (and copied into ``out``, if given)."""
        down, up, keys = super()._initial_rows(n, n_keys, self.full_dim, self.full_dim_out)
        for value in (down, up, keys):
            dist.broadcast(value, src=_src(self.group), group=self.group)
        rows = down[:, self.columns("down")], up[:, self.columns("up")], keys
        if out is None:
            return rows
        for table, value in zip(out, rows, strict=True):
            table.copy_(value)
        return out


class ShardedPEER(_SharedGroup, PEER):
    """A :class:`PEER` layer whose ``down``/``up`` tables are split by columns over ranks.

    Build it with :func:`shard_columns` from a PEER (equal on every rank, or made equal:
    rank 0's state is broadcast). Everything but ``forward`` is PEER's: ``grow``,
    ``freeze``, ``reserve``, owners, ``state_dict`` (of the local blocks; for a whole
    checkpoint use :func:`peer_ll.experts.sharded_checkpoint.global_state_dict` with DCP,
    as :func:`peer_ll.strategies.distributed.save_checkpoint` does).
    ``layer.down``/``layer.up`` are the local blocks (capacity, D/W) and (capacity, E/W).

    Inputs are data-parallel: each rank passes its own tokens (any number, 0 included)
    and gets their outputs. Routing statistics count the local tokens' retrievals.

    Shapes: input (..., D) -> output (..., E), per rank.
    """

    group = None
    rank = 0
    world = 1

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """Apply the layer to this rank's ``x`` (..., D) -> (..., E); collective.

        Args:
            x: (..., D) this rank's inputs (cast to the layer's dtype).
            owners: as in :meth:`PEER.forward`, for this rank's inputs.
        """
        segments, mask = self._searched(x, owners)
        x = self._cast(x)
        flat = x.reshape(-1, self.dim)
        sizes = token_counts(flat.shape[0], flat.device, self.group)
        if sum(sizes) == 0:
            return x.new_zeros(*x.shape[:-1], self.dim_out)
        if flat.shape[0]:
            q = self.query(flat)  # (T_r, H, d)
            with torch.no_grad():
                _, ids = self._search(q.detach(), segments, mask, self.topk)  # (T_r, H, K)
            scores = self._scores(q, ids)
            gates = scores.softmax(dim=-1) if self.gate == "softmax" else scores.sigmoid()
            if self.stats.track:
                self.stats.record(ids, gates.detach())
        else:  # no tokens here, but the collectives need this rank
            ids = torch.zeros(0, self.heads, self.topk, dtype=torch.long, device=x.device)
            gates = flat.new_zeros(0, self.heads, self.topk)
        self.pool.tag()
        out = sharded_mix(
            flat,
            ids.reshape(flat.shape[0], self.heads * self.topk),
            gates.reshape(flat.shape[0], self.heads * self.topk),
            self.pool.down,
            self.pool.up,
            sizes=sizes,
            rank=self.rank,
            group=self.group,
            activation=self.activation,
            frozen=self.pool.expert_frozen,
            sparse_grad=self.sparse_grad,
        )  # (T_r, E)
        return out.view(*x.shape[:-1], self.dim_out)

    def unshard(self) -> PEER:
        """A whole :class:`PEER` equal to this layer (collective; every rank gets it).

        It all-gathers the column blocks: it needs the whole tables' memory on each rank.
        """
        pool = self.pool
        layer = copy.deepcopy(self, {id(pool): None})
        layer.__class__ = PEER
        for name in ("group", "rank", "world"):
            layer.__dict__.pop(name, None)
        whole = ExpertPool(
            pool.full_dim,
            pool.full_dim_out,
            pool.dim_key,
            heads=pool.heads,
            capacity=pool.capacity,
            key_capacity=pool.key_capacity,
        ).to(pool.down.device, pool.down.dtype)
        with torch.no_grad():
            for name in SHARDED_TABLES:
                block = getattr(pool, name).detach().contiguous()
                parts = [torch.empty_like(block) for _ in range(self.world)]
                dist.all_gather(parts, block, group=self.group)
                getattr(whole, name).copy_(torch.cat(parts, dim=1))
                getattr(whole, name).requires_grad_(getattr(pool, name).requires_grad)
            whole.sub_keys.copy_(pool.sub_keys)
            whole.sub_keys.requires_grad_(pool.sub_keys.requires_grad)
        for name in ("segments", "segment_owner", "expert_owner", "expert_frozen", "key_frozen"):
            setattr(whole, name, getattr(pool, name).clone())
        whole.tag()
        layer.pool = whole
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard={self.rank}/{self.world} (columns)"


def shard_columns(layer: PEER, group=None) -> ShardedPEER:
    """Split ``layer``'s expert tables by columns over the ranks of ``group``.

    Collective: every rank calls it with its copy of the layer; rank 0's parameters and
    buffers are broadcast first, so the copies need not agree. ``layer`` itself is left
    as it was. D and E must be multiples of the group's size.

    Args:
        layer: a PEER layer (not already sharded).
        group: a process group (default: the world).

    Returns:
        A :class:`ShardedPEER` holding this rank's column blocks; the query network,
        sub-keys and pool layout are copies of rank 0's.

    Raises:
        ValueError: no process group, or D or E not divisible by the group's size.
        TypeError: ``layer`` is not a PEER (or is already sharded).
    """
    check_type("layer", layer, PEER)
    if isinstance(layer, ShardedPEER):
        raise TypeError("layer must be an unsharded PEER, got a ShardedPEER")
    if not dist.is_initialized():
        raise ValueError(
            "torch.distributed must be initialized to shard a layer, got no process group"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, size in (("dim", layer.dim), ("dim_out", layer.dim_out)):
        if size % world:
            raise ValueError(
                f"layer.{name} must be a multiple of the {world} ranks to split columns, got {size}"
            )
    sharded = copy.deepcopy(layer)
    with torch.no_grad():
        for value in sharded.state_dict().values():
            if isinstance(value, torch.Tensor):
                dist.broadcast(value, src=_src(group), group=group)
    sharded.__class__ = ShardedPEER
    sharded.group, sharded.rank, sharded.world = group, rank, world
    after_load(sharded, None)  # frozen_query may have come from rank 0
    sharded.pool = ShardedPool(sharded.pool, rank, world, group)
    return sharded


def shard_peer_layers(model: nn.Module, group=None) -> dict[str, ShardedPEER]:
    """Replace every PEER layer inside ``model`` by :func:`shard_columns` of it, in place.

    Layers already sharded are left as they are (so calling it again changes nothing).

    Returns:
        The layers sharded by this call, by module name (``model`` itself cannot be a PEER).
    """
    check_type("model", model, nn.Module)
    if isinstance(model, PEER):
        raise TypeError("model must hold PEER layers, got a PEER: call shard_columns on it")
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, PEER) and not isinstance(m, ShardedPEER)
    ]
    done = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        done[name] = shard_columns(getattr(parent, child), group)
        setattr(parent, child, done[name])
    return done
