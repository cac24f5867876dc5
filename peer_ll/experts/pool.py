"""Storage of a growable PEER pool: expert tables, sub-key segments, owners, freezing.

:class:`ExpertPool` is the module that :class:`peer_ll.experts.PEER` holds as ``pool``.
Its tables are contiguous with spare capacity, like a vector:

- ``down`` (capacity, D) and ``up`` (capacity, E): expert ``i`` is row ``i``;
- ``sub_keys`` (key_capacity, 2, d/2): left (``[:, 0]``) and right (``[:, 1]``) halves;
- ``segments`` (S, 4) int64: ``[key_offset, n_left, n_right, expert_offset]``.

Expert ids are rows and never change. Growth within capacity writes into the spare
rows in place, so every Parameter object, and the optimizer state keyed by it, stays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from peer_ll.experts.checkpoint import check_checkpoint
from peer_ll.experts.checks import check_allocation, check_int, check_owner
from peer_ll.kernels.memory import huge_zeros

TABLES = ("down", "up", "sub_keys")
_STORAGE = (*TABLES, "segments", "segment_owner", "expert_owner", "expert_frozen", "key_frozen")


class ExpertPool(nn.Module):
    """Expert tables and product sub-keys in owner-tagged segments.

    Args:
        dim: input size D of an expert.
        dim_out: output size E of an expert.
        dim_key: full key size d (each sub-key holds d/2).
        heads: retrieval heads h (scales the initial ``up`` rows).
        capacity: expert rows to reserve.
        key_capacity: sub-key rows to reserve.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        dim_key: int,
        *,
        heads: int,
        capacity: int,
        key_capacity: int,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out, self.dim_key, self.heads = dim, dim_out, dim_key, heads
        self.down = nn.Parameter(huge_zeros(capacity, dim))  # rows far apart: 2 MiB pages
        self.up = nn.Parameter(huge_zeros(capacity, dim_out))
        self.sub_keys = nn.Parameter(torch.zeros(key_capacity, 2, dim_key // 2))
        self.register_buffer("segments", torch.zeros(0, 4, dtype=torch.long))
        self.register_buffer("segment_owner", torch.zeros(0, dtype=torch.long))
        self.register_buffer("expert_owner", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("expert_frozen", torch.zeros(capacity, dtype=torch.bool))
        self.register_buffer("key_frozen", torch.zeros(key_capacity, dtype=torch.bool))
        #: Parameters replaced by the last reallocation, {name: (old, new)}; carry their
        #: optimizer state with :func:`peer_ll.optim.migrate_state`.
        self.replaced_parameters: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.tag()

    # ------------------------------------------------------------------- sizes
    @property
    def num_experts(self) -> int:
        """Number of experts in the pool (rows in use)."""
        if not len(self.segments):
            return 0
        last = self.segments[-1]
        return int(last[3] + last[1] * last[2])

    @property
    def num_sub_keys(self) -> int:
        """Sub-key rows in use."""
        if not len(self.segments):
            return 0
        return int((self.segments[:, 0] + self.segments[:, 1:3].max(dim=1).values).max())

    num_segments = property(lambda self: len(self.segments), doc="Segments S.")
    capacity = property(lambda self: self.down.shape[0], doc="Expert rows reserved.")
    key_capacity = property(lambda self: self.sub_keys.shape[0], doc="Sub-key rows reserved.")

    # ------------------------------------------------------------------- growth
    def grow(self, num_keys: int, *, owner: int, num_keys_right: int | None = None) -> torch.Tensor:
        """Append one product-key segment of num_keys × num_keys_right new experts.

        Existing ids, sub-keys and expert weights are never changed. Within capacity
        nothing is allocated; past it the tables are reallocated and the replaced
        Parameters are listed in ``replaced_parameters`` (carry optimizer state over
        with :func:`peer_ll.optim.migrate_state`). A failed grow changes nothing.

        Args:
            num_keys: sub-keys per side (left side if ``num_keys_right`` is given).
            owner: owner id (task or experience) of the new experts.
            num_keys_right: sub-keys on the right side (default: ``num_keys``).

        Returns:
            (num_keys * num_keys_right,) int64 ids of the new experts.
        """
        check_int("num_keys", num_keys, minimum=1)
        n_right = num_keys if num_keys_right is None else num_keys_right
        check_int("num_keys_right", n_right, minimum=1)
        owner = check_owner("owner", owner)
        start = self.num_experts
        need_rows = start + num_keys * n_right
        need_keys = self.num_sub_keys + max(num_keys, n_right)
        grows = need_rows > self.capacity or need_keys > self.key_capacity
        rows = max(need_rows, self.capacity * 3 // 2) if grows else 0  # new capacities
        keys = max(need_keys, self.key_capacity * 3 // 2) if grows else 0
        self.check_room(rows, keys, "grow", extra_rows=2 * num_keys * n_right)  # + temporaries
        saved = {name: getattr(self, name) for name in _STORAGE}
        saved_replaced = self.replaced_parameters
        try:
            if grows:
                self._reallocate(rows, keys)
            self._append_segment(num_keys, owner, n_right)
        except BaseException:  # the old tensors were never written: put them back
            for name, value in saved.items():
                setattr(self, name, value)
                value.__dict__.pop("peer_replaced", None)
            self.replaced_parameters = saved_replaced
            self.tag()
            raise
        return torch.arange(start, need_rows, device=self.down.device)

    def reserve(self, capacity: int, key_capacity: int | None = None) -> None:
        """Reserve room for ``capacity`` experts and ``key_capacity`` sub-keys.

        Reallocates (replacing Parameters) only if the current room is smaller.
        """
        check_int("capacity", capacity, minimum=1)
        key_capacity = self.key_capacity if key_capacity is None else key_capacity
        check_int("key_capacity", key_capacity, minimum=1)
        if capacity > self.capacity or key_capacity > self.key_capacity:
            capacity = max(capacity, self.capacity)
            key_capacity = max(key_capacity, self.key_capacity)
            self.check_room(capacity, key_capacity, "reserve")
            self._reallocate(capacity, key_capacity)

    def check_room(self, capacity: int, key_capacity: int, name: str, extra_rows: int = 0) -> None:
        """Raise ValueError, before allocating, if new tables of this size (and
        ``extra_rows`` temporary rows) cannot fit in the memory available."""
        size = self.down.element_size()
        row = (self.dim + self.dim_out) * size + 9  # + owner (8 bytes) and frozen flag
        nbytes = (capacity + extra_rows) * row + key_capacity * (self.dim_key * size + 1)
        check_allocation(
            f"{name} (capacity={capacity}, key_capacity={key_capacity})", nbytes, self.down.device
        )

    def _append_segment(self, n_left: int, owner: int, n_right: int) -> None:
        rows, key_off = self.num_experts, self.num_sub_keys
        n, n_keys = n_left * n_right, max(n_left, n_right)
        segment = torch.tensor([[key_off, n_left, n_right, rows]], device=self.down.device)
        with torch.no_grad():  # everything written lies past the rows in use
            dest = (self.down[rows : rows + n], self.up[rows : rows + n],
                    self.sub_keys[key_off : key_off + n_keys])  # fmt: skip
            if all(t.dtype == torch.float32 for t in dest):  # drawn in place: no table copy
                self._initial_rows(n, n_keys, out=dest)
            else:
                for table, rows_drawn in zip(dest, self._initial_rows(n, n_keys), strict=True):
                    table.copy_(rows_drawn)
        self.expert_owner[rows : rows + n] = owner
        self.expert_frozen[rows : rows + n] = False
        self.key_frozen[key_off : key_off + n_keys] = False
        self.segment_owner = torch.cat([self.segment_owner, self.segment_owner.new_tensor([owner])])
        self.segments = torch.cat([self.segments, segment])  # last: makes the rows visible

    def _initial_rows(self, n: int, n_keys: int, dim=None, dim_out=None, out=None) -> tuple:
        """down (n, D) ~ N(0, 1/D) as a Linear's fan-in, up (n, E) ~ N(0, 1/h) (h heads sum
        to O(1)), sub-keys (n_keys, 2, d/2) ~ N(0, 2/d): unit-variance half scores; float32,
        or drawn in place into ``out``, three contiguous float32 tensors of those shapes."""
        dim, dim_out = dim or self.dim, dim_out or self.dim_out
        dev, half = self.down.device, self.dim_key // 2
        if out is None:
            out = (torch.empty(n, dim, device=dev), torch.empty(n, dim_out, device=dev),
                   torch.empty(n_keys, 2, half, device=dev))  # fmt: skip
        for table, scale in zip(out, (dim, self.heads, half), strict=True):
            table.normal_().div_(math.sqrt(scale))  # = torch.randn(...) / sqrt(scale)
        return out

    def _reallocate(self, capacity: int, key_capacity: int) -> None:
        """Move the tables into new storage; builds everything before swapping it in."""
        rows, n_keys = self.num_experts, self.num_sub_keys
        if capacity < rows or key_capacity < n_keys:
            raise ValueError(
                f"capacity must hold the {rows} experts and {n_keys} sub-keys in use, "
                f"got capacity={capacity}, key_capacity={key_capacity}"
            )
        sizes = {"down": capacity, "up": capacity, "sub_keys": key_capacity}
        fresh = {}
        for name in TABLES:
            old = getattr(self, name)
            new = huge_zeros(sizes[name], *old.shape[1:], dtype=old.dtype, device=old.device)
            used = rows if name != "sub_keys" else n_keys
            new[:used] = old.detach()[:used]
            fresh[name] = nn.Parameter(new, requires_grad=old.requires_grad)

        def resized(buf: torch.Tensor, size: int, fill: object) -> torch.Tensor:
            out = buf.new_full((size,), fill)
            out[: min(size, len(buf))] = buf[: min(size, len(buf))]
            return out

        buffers = {
            "expert_owner": resized(self.expert_owner, capacity, -1),
            "expert_frozen": resized(self.expert_frozen, capacity, False),
            "key_frozen": resized(self.key_frozen, key_capacity, False),
        }
        replaced = {name: (getattr(self, name), fresh[name]) for name in TABLES}
        for name, value in {**fresh, **buffers}.items():  # nothing below can fail
            setattr(self, name, value)
        for old, _ in replaced.values():  # an optimizer still holding it refuses to step
            old.peer_replaced = True
        self.replaced_parameters = replaced
        self.tag()

    # ----------------------------------------------------------------- freezing
    def segments_of(self, owners: int | Iterable[int] | None) -> torch.Tensor:
        """(S,) bool: segments whose owner is in ``owners`` (None: all)."""
        if owners is None:
            return torch.ones(len(self.segments), dtype=torch.bool)
        wanted = [owners] if isinstance(owners, int | torch.Tensor) else list(owners)
        wanted = {check_owner("owners", o) for o in wanted}
        present = set(self.segment_owner.tolist())
        if wanted - present:
            raise ValueError(f"owners must be among {sorted(present)}, got {sorted(wanted)}")
        return torch.tensor([o in wanted for o in self.segment_owner.tolist()], dtype=torch.bool)

    def set_frozen(self, selected: torch.Tensor, value: bool, *, keys: bool) -> None:
        """Set the frozen flag of the rows (and, with ``keys``, sub-keys) of segments."""
        for s in selected.nonzero().flatten().tolist():
            key_off, n_left, n_right, start = self.segments[s].tolist()
            self.expert_frozen[start : start + n_left * n_right] = value
            if keys:
                self.key_frozen[key_off : key_off + max(n_left, n_right)] = value

    def tag(self) -> None:
        """Point each table at its frozen-row mask, for row-aware optimizers."""
        self.down.peer_frozen_rows = self.expert_frozen
        self.up.peer_frozen_rows = self.expert_frozen
        self.sub_keys.peer_frozen_rows = self.key_frozen

    # -------------------------------------------------------------- introspection
    def key_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-key rows (left, right) of expert ``ids``; same shape as ``ids``."""
        seg = torch.searchsorted(self.segments[:, 3].contiguous(), ids, right=True) - 1
        key_off, _, n_right, start = self.segments[seg].unbind(-1)
        local = ids - start
        return key_off + local // n_right, key_off + local % n_right

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of (down (N, D), up (N, E)) for the experts in use (no gradient)."""
        n = self.num_experts
        return self.down.detach()[:n], self.up.detach()[:n]

    def expert_keys(self) -> torch.Tensor:
        """(N, d) full product key ``[c_a; c'_b]`` of every expert, row i for expert i."""
        ids = torch.arange(self.num_experts, device=self.down.device)
        left, right = self.key_rows(ids)
        keys = self.sub_keys.detach()
        return torch.cat([keys[left, 0], keys[right, 1]], dim=-1)

    # --------------------------------------------------------------- state_dict
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        if prefix + "segments" in state_dict:
            check_checkpoint(self, state_dict, prefix)
            self._match_checkpoint(state_dict, prefix, state_dict[prefix + "segments"])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        self.tag()

    def _match_checkpoint(self, state_dict, prefix: str, saved: torch.Tensor) -> None:
        """Grow this pool's storage to the checkpoint's (checked by ``check_checkpoint``)."""
        mine, keys = self.segments, state_dict.get(prefix + "sub_keys")
        down = state_dict.get(prefix + "down")
        capacity = self.capacity if down is None else down.shape[0]
        key_capacity = self.key_capacity if keys is None else keys.shape[0]
        if capacity != self.capacity or key_capacity != self.key_capacity:
            self._reallocate(capacity, key_capacity)
        self.segments = torch.empty_like(saved, device=mine.device)
        self.segment_owner = torch.empty(len(saved), dtype=torch.long, device=mine.device)


def view(name: str, part: str = "pool", *, settable: bool = False) -> property:
    """A property of a PEER layer that reads (and writes) ``layer.<part>.<name>``."""

    def get(self):
        return getattr(getattr(self, part), name)

    def set_(self, value):
        setattr(getattr(self, part), name, value)

    return property(get, set_ if settable else None, doc=f"``{part}.{name}``")
