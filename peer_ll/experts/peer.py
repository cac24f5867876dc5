"""PEER: Parameter Efficient Expert Retrieval with a growable pool of experts.

He, *Mixture of A Million Experts*, arXiv 2407.04153 (2024). Axis letters:
``T`` tokens, ``H`` heads, ``K`` top-k, ``D`` dim, ``E`` dim_out, ``d`` dim_key,
``S`` segments, ``N`` experts.
"""

from __future__ import annotations

import torch
from torch import nn

from peer_ll.experts.checkpoint import after_load, load_or_restore, prepare_checkpoint
from peer_ll.experts.checks import (
    check_bool,
    check_choices,
    check_input,
    check_layer_args,
)
from peer_ll.experts.owners import Owners, select_segments
from peer_ll.experts.pool import ExpertPool, view
from peer_ll.experts.query import make_query_norm, normed_query
from peer_ll.experts.query_adapter import (
    adapted_scores,
    adapted_topk,
    attach_adapter,
    sync_adapter,
)
from peer_ll.experts.routing import RoutingStats, retrieval_confidence, retrieve
from peer_ll.kernels.expert_mix import expert_mix
from peer_ll.kernels.product_topk import product_topk
from peer_ll.kernels.selected_scores import selected_scores


class PEER(nn.Module):
    r"""A PEER layer whose expert pool grows by segments, one owner per segment.

    For x in R^D, with h heads and product keys shared by all heads:

    - query ``q = norm(W_q x)``, one query of size ``dim_key`` per head;
    - per head, exact top-k over all experts' keys ``[c_a; c'_b]`` by product-key
      search (per-half top-k, k² candidate sums, final top-k), inside every segment,
      merged over segments;
    - gates ``g = softmax(top-k scores)``;
    - output ``f(x) = Σ_heads Σ_{i ∈ top-k} g_i · σ(u_iᵀ x) · v_i`` (no biases).

    It holds ``pool`` (:class:`~peer_ll.experts.pool.ExpertPool`: tables, sub-keys,
    segments, owners, frozen masks) and ``stats`` (:class:`RoutingStats`: router mass).
    Opt-in departures from the paper: ``query_norm="layer"`` or ``None`` (BatchNorm mixes
    a causal LM's positions), ``gate="sigmoid"``, ``activation="relu"``, and a per-owner
    query transform (:meth:`attach_query_adapter`).

    Args:
        dim: input size D.
        dim_out: output size E (default: D).
        num_keys: sub-keys per side of the first segment; it holds num_keys² experts.
        heads: number of retrieval heads h.
        topk: experts retrieved per head, k.
        dim_key: query/key size d (even: it splits into two halves).
        query_norm: "batch" (paper), "layer" or None.
        gate: "softmax" (paper) or "sigmoid".
        activation: "gelu" (paper) or "relu".
        capacity: expert rows to reserve (default: num_keys²; sub-key room follows).
            Growth within capacity allocates nothing and keeps every Parameter.
        owner: owner id of the first segment's experts.
        backend: kernels to use, "auto" | "torch" | "triton".

    Attributes:
        sparse_grad: row-sparse expert-table gradients (default True: needs a sparse-aware
            optimizer such as ``peer_ll.optim.make_optimizer``); False for a stock one.

    Shapes: input (..., D) -> output (..., E).
    """

    takes_owners = True  # forward(x, owners=None); see peer_ll.experts.call_with_owners

    def __init__(
        self,
        dim: int,
        *,
        dim_out: int | None = None,
        num_keys: int = 1024,  # paper: N = 1024² experts
        heads: int = 8,  # paper: h = 8
        topk: int = 16,  # paper: k = 16
        dim_key: int = 128,  # paper: 128
        query_norm: str | None = "batch",  # paper: BatchNorm on queries
        gate: str = "softmax",  # paper: softmax over the k scores
        activation: str = "gelu",  # paper: GELU
        capacity: int | None = None,
        owner: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        choices = dict(query_norm=query_norm, gate=gate, activation=activation, backend=backend)
        sizes = check_layer_args(dim, dim_out, num_keys, heads, topk, dim_key, capacity, owner)
        dim_out, capacity, key_capacity, owner = sizes
        check_choices(**choices)
        self.dim, self.dim_out, self.heads, self.topk = dim, dim_out, heads, topk
        self.dim_key, self.num_keys = dim_key, num_keys
        self.query_norm_kind, self.gate, self.activation = query_norm, gate, activation
        self.sparse_grad, self.backend = True, backend
        self.query_frozen = False  # mirrored in the buffer frozen_query (state_dict)
        self.register_buffer("frozen_query", torch.tensor(False))
        self.to_query = nn.Linear(dim, heads * dim_key, bias=False)
        self.query_norm = make_query_norm(query_norm, heads, dim_key)
        self.pool = ExpertPool(
            dim, dim_out, dim_key, heads=heads, capacity=capacity, key_capacity=key_capacity
        )
        self.stats = RoutingStats(capacity)
        self.query_adapter: nn.Module | None = None
        self.pool.grow(num_keys, owner=owner)
        self.register_load_state_dict_post_hook(after_load)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """Apply the layer: (..., D) -> (..., E).

        Args:
            x: (..., D) inputs of any floating dtype; they are cast to the layer's dtype.
                An empty batch (a zero in ``...``) gives an empty output.
            owners: restrict retrieval to these owners' experts: None (every expert,
                the paper's layer), an int, a sequence of ints, or an integer tensor of
                shape (...) with one owner per input. Checked before anything changes.
        """
        segments, mask = self._searched(x, owners)
        x = self._cast(x)
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.dim_out)
        q = self.query(x).reshape(-1, self.heads, self.dim_key)  # (T, H, d)
        with torch.no_grad():
            _, ids = self._search(q.detach(), segments, mask, self.topk)  # (T, H, K)
        scores = self._scores(q, ids)  # (T, H, K), differentiable
        gates = scores.softmax(dim=-1) if self.gate == "softmax" else scores.sigmoid()
        if self.stats.track:
            self.stats.record(ids, gates.detach())
        self.pool.tag()  # a .to(device) replaces the masks' buffers
        out = expert_mix(
            x.reshape(-1, self.dim),
            ids,
            gates,
            self.pool.down,
            self.pool.up,
            activation=self.activation,
            frozen=self.pool.expert_frozen,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
        )  # (T, E)
        return out.view(*x.shape[:-1], self.dim_out)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked and cast to the dtype of the layer's weights."""
        check_input(x, self.dim)
        dtype = self.to_query.weight.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries after the norm: (..., D) -> (..., H, d); any float dtype is cast."""
        return normed_query(self, self._cast(x))

    def retrieve(
        self, x: torch.Tensor, owners: Owners = None, *, k: int | None = None, pad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k retrieval without gradient: (..., D) -> scores, ids, each (..., H, k).

        ``k`` (default: topk) may not exceed the experts that ``owners`` can search,
        unless ``pad``: missing places then get id -1 and score -inf.
        """
        return retrieve(self, x, owners, k=k, pad=pad)

    def _searched(self, x, owners: Owners, need: int | None = None):
        """Segments that ``owners`` may search and an optional (T, S) mask; checks both."""
        check_input(x, self.dim)
        return select_segments(
            owners,
            self.pool.segments,
            self.pool.segment_owner,
            tuple(x.shape[:-1]),
            need=self.topk if need is None else need,
        )

    def _search(self, q, segments, mask, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (T, H, k) of q (T, H, d) over ``segments``, per-owner query if adapted."""
        if self.query_adapter is not None:
            return adapted_topk(self.query_adapter, q, self.pool, segments, mask, k, self.backend)
        return product_topk(
            q, self.pool.sub_keys, segments, k, segment_mask=mask, backend=self.backend
        )

    def _scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Differentiable scores (T, H, K) of ``ids``; gradients reach q and unfrozen keys."""
        if self.query_adapter is not None:
            return adapted_scores(self.query_adapter, q, ids, self.pool, self.backend)
        left, right = self.pool.key_rows(ids)  # (T, H, K) each
        return selected_scores(
            q, self.pool.sub_keys, left, right, frozen=self.pool.key_frozen, backend=self.backend
        )

    def attach_query_adapter(self, module: nn.Module) -> None:
        """Score owner o's sub-keys with ``module(q, o)``: q (T, H, d) -> (T, H, d).

        Configuration, set once (like PEFT injecting an adapter). The module must
        accept every owner present (the identity for an unknown owner is fine).
        """
        self.query_adapter = attach_adapter(self, module)

    # ------------------------------------------------------------ growth, freezing
    def grow(self, num_keys: int, *, owner: int, num_keys_right: int | None = None) -> torch.Tensor:
        """Append a segment of num_keys × num_keys experts of ``owner``; returns their ids.

        See :meth:`peer_ll.experts.pool.ExpertPool.grow`: ids, keys and weights in use
        never change, and a failed grow changes nothing.
        """
        ids = self.pool.grow(num_keys, owner=owner, num_keys_right=num_keys_right)
        self.stats.resize(self.pool.capacity)
        return ids

    def reserve(self, capacity: int, key_capacity: int | None = None) -> None:
        """Reserve room for ``capacity`` experts and ``key_capacity`` sub-keys."""
        self.pool.reserve(capacity, key_capacity)
        self.stats.resize(self.pool.capacity)

    def freeze(self, owners=None, *, keys: bool = True, query: bool = False) -> None:
        """Freeze the experts of ``owners`` (None: all; []: none), and optionally more.

        Frozen rows get no gradient, no moment and no weight decay from
        :func:`peer_ll.optim.make_optimizer` (``torch.optim.AdamW`` still decays them).

        Args:
            owners: an owner id, an iterable of ids, or None for every owner.
            keys: also freeze those segments' sub-keys (and their query adapters).
            query: also freeze the query network (its norm then uses running statistics).
        """
        self._set_frozen(owners, True, keys, query)

    def unfreeze(self, owners=None, *, keys: bool = True, query: bool = True) -> None:
        """Undo :meth:`freeze` for ``owners`` (None: all)."""
        self._set_frozen(owners, False, keys, query)

    def _set_frozen(self, owners, value: bool, keys: bool, query: bool) -> None:
        check_bool("keys", keys)
        check_bool("query", query)
        self.pool.set_frozen(self.pool.segments_of(owners), value, keys=keys)
        if query:
            self._freeze_query(value)
        sync_adapter(self.query_adapter, self.pool)

    def _freeze_query(self, value: bool) -> None:
        self.query_frozen = value
        self.frozen_query.fill_(value)
        for p in [*self.to_query.parameters(), *self.query_norm.parameters()]:
            p.requires_grad_(not value)

    # ------------------------------------------------------------ pool and stats
    owners = property(lambda self: self.pool.expert_owner[: self.num_experts])
    frozen = property(lambda self: self.pool.expert_frozen[: self.num_experts])
    expert_mass = property(lambda self: self.stats.mass[: self.num_experts])
    num_experts, num_segments, capacity, key_capacity, num_sub_keys = map(
        view, ("num_experts", "num_segments", "capacity", "key_capacity", "num_sub_keys")
    )
    segments, segment_owner, down, up, sub_keys, expert_frozen, key_frozen = map(
        view, ("segments", "segment_owner", "down", "up", "sub_keys", "expert_frozen", "key_frozen")
    )
    replaced_parameters = view("replaced_parameters", settable=True)
    router_mass = view("mass", "stats")
    track_routing = view("track", "stats", settable=True)

    expert_keys, expert_weights = view("expert_keys"), view("expert_weights")  # methods
    reset_routing_stats = view("reset", "stats")  # method: zero the router mass

    def routing_stats(self) -> dict[str, float]:
        """``{"usage", "unevenness", "mass"}`` of the mass accumulated since the reset."""
        return self.stats.summary(self.num_experts)

    def retrieval_confidence(self, x: torch.Tensor, owners: Owners = None) -> dict:
        """``margin``, ``gate_entropy`` per token: see ``routing.retrieval_confidence``."""
        return retrieval_confidence(self, x, owners)

    # --------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint, growing to its pool; a failed load changes nothing.

        The whole checkpoint is checked first; any failure raises ValueError or
        TypeError and leaves the layer exactly as it was (see ``load_or_restore``).
        """
        return load_or_restore(
            self,
            lambda: super(PEER, self).load_state_dict(state_dict, strict=strict, assign=assign),
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):
        prepare_checkpoint(self, state_dict, prefix, strict)  # checks all before any change
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, topk={self.topk}, "
            f"dim_key={self.dim_key}, num_experts={self.num_experts}, segments="
            f"{self.num_segments}, capacity={self.capacity}, query_norm="
            f"{self.query_norm_kind!r}, gate={self.gate!r}, activation={self.activation!r}"
        )
