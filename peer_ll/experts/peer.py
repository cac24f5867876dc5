"""PEER: Parameter Efficient Expert Retrieval with a growable pool of experts.

He, *Mixture of A Million Experts*, arXiv 2407.04153 (2024). Axis letters:
``T`` tokens, ``H`` heads, ``K`` top-k, ``D`` dim, ``E`` dim_out, ``d`` dim_key,
``S`` segments, ``N`` experts.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.experts.checks import check_choice, check_input, check_int, check_owner, check_type
from peer_ll.experts.owners import Owners, select_segments
from peer_ll.experts.pool import _STORAGE, ExpertPool
from peer_ll.experts.routing import RoutingStats
from peer_ll.kernels.expert_mix import expert_mix
from peer_ll.kernels.product_topk import product_topk
from peer_ll.kernels.selected_scores import selected_scores

logger = logging.getLogger(__name__)

QUERY_NORMS = ("batch", "layer", None)
GATES = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "relu")
BACKENDS = ("auto", "torch", "triton")


class PEER(nn.Module):
    r"""A PEER layer whose expert pool grows by segments, one owner per segment.

    For x in R^D, with h heads and product keys shared by all heads:

    - query ``q = norm(W_q x)``, one query of size ``dim_key`` per head;
    - per head, exact top-k over all experts' keys ``[c_a; c'_b]`` by product-key
      search (per-half top-k, k² candidate sums, final top-k), inside every segment,
      merged over segments;
    - gates ``g = softmax(top-k scores)``;
    - output ``f(x) = Σ_heads Σ_{i ∈ top-k} g_i · σ(u_iᵀ x) · v_i`` (no biases).

    The layer holds ``pool`` (:class:`~peer_ll.experts.pool.ExpertPool`: tables,
    sub-keys, segments, owners, frozen masks) and ``stats``
    (:class:`~peer_ll.experts.routing.RoutingStats`: router mass). Departures from
    the paper, all opt-in: ``query_norm="layer"`` or ``None`` (BatchNorm mixes the
    positions of a causal language model), ``gate="sigmoid"``, ``activation="relu"``,
    and an optional per-owner query transform (:meth:`attach_query_adapter`).

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
        capacity: expert rows to reserve (default: exactly num_keys²). Growth within
            capacity allocates nothing and keeps every Parameter object; sub-key room
            follows (segments of ``num_keys`` sub-keys per side).
        owner: owner id of the first segment's experts.
        sparse_grad: give the expert tables row-sparse gradients (needs
            ``peer_ll.optim.make_optimizer`` or another sparse-aware optimizer).
        backend: kernels to use, "auto" | "torch" | "triton".

    Shapes:
        input (..., D) -> output (..., E).
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
        sparse_grad: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        dim_out = dim if dim_out is None else check_int("dim_out", dim_out, minimum=1)
        check_int("num_keys", num_keys, minimum=1)
        check_int("heads", heads, minimum=1)
        check_int("topk", topk, minimum=1, maximum=num_keys * num_keys)
        check_int("dim_key", dim_key, minimum=2)
        if dim_key % 2:
            raise ValueError(f"dim_key must be even (it splits into two halves), got {dim_key}")
        check_choice("query_norm", query_norm, QUERY_NORMS)
        check_choice("gate", gate, GATES)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        owner = check_owner("owner", owner)
        first = num_keys * num_keys
        capacity = first if capacity is None else check_int("capacity", capacity, minimum=first)

        self.dim, self.dim_out, self.heads, self.topk, self.dim_key = (
            dim, dim_out, heads, topk, dim_key,
        )
        self.num_keys = num_keys
        self.query_norm_kind, self.gate, self.activation = query_norm, gate, activation
        self.sparse_grad, self.backend = sparse_grad, backend
        self.query_frozen = False
        self.to_query = nn.Linear(dim, heads * dim_key, bias=False)
        self.query_norm = {
            "batch": lambda: nn.BatchNorm1d(heads * dim_key),
            "layer": lambda: nn.LayerNorm(dim_key),
            None: nn.Identity,
        }[query_norm]()
        key_capacity = max(num_keys, math.ceil(capacity / num_keys))
        self.pool = ExpertPool(dim, dim_out, dim_key, heads=heads, capacity=capacity,
                               key_capacity=key_capacity)
        self.stats = RoutingStats(capacity)
        self.query_adapter: nn.Module | None = None
        self.pool.grow(num_keys, owner=owner)
        self.register_load_state_dict_post_hook(PEER._after_load)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """Apply the layer: (..., D) -> (..., E).

        Args:
            x: (..., D) floating inputs.
            owners: restrict retrieval to these owners' experts: None (every expert,
                the paper's layer), an int, a sequence of ints, or an integer tensor of
                shape (...) with one owner per input. Checked before anything changes.
        """
        segments, mask = self._searched(x, owners)
        q = self.query(x).reshape(-1, self.heads, self.dim_key)  # (T, H, d)
        with torch.no_grad():
            _, ids = self._search(q.detach(), segments, mask, self.topk)  # (T, H, K)
        scores = self._scores(q, ids)  # (T, H, K), differentiable
        gates = scores.softmax(dim=-1) if self.gate == "softmax" else scores.sigmoid()
        if self.stats.track:
            self.stats.record(ids, gates.detach())
        self.pool.tag()  # a .to(device) replaces the masks' buffers
        out = expert_mix(
            x.reshape(-1, self.dim), ids, gates, self.pool.down, self.pool.up,
            activation=self.activation, frozen=self.pool.expert_frozen,
            sparse_grad=self.sparse_grad, backend=self.backend,
        )  # (T, E)
        return out.view(*x.shape[:-1], self.dim_out)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries after the norm: (..., D) -> (..., H, d)."""
        check_input(x, self.dim)
        lead = x.shape[:-1]
        q = self.to_query(x.reshape(-1, self.dim))  # (T, H*d)
        if self.query_norm_kind == "batch":
            bn = self.query_norm
            training = bn.training and not self.query_frozen  # frozen: running statistics
            if training and q.shape[0] == 1:
                raise ValueError(
                    "x must hold more than one input in training with query_norm='batch' "
                    "(BatchNorm needs batch statistics), got 1: use a larger batch (e.g. "
                    "Avalanche's train_mb_size > 1) or PEER(..., query_norm='layer')"
                )
            q = F.batch_norm(q, bn.running_mean, bn.running_var, bn.weight, bn.bias, training,
                             bn.momentum, bn.eps)
        q = q.view(-1, self.heads, self.dim_key)  # (T, H, d)
        if self.query_norm_kind == "layer":
            q = self.query_norm(q)
        return q.view(*lead, self.heads, self.dim_key)

    def retrieve(
        self, x: torch.Tensor, owners: Owners = None, *, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k retrieval without gradient: (..., D) -> scores, ids, each (..., H, k)."""
        k = self.topk if k is None else check_int("k", k, minimum=1)
        segments, mask = self._searched(x, owners, need=min(k, self.topk))
        q = self.query(x)
        lead = q.shape[:-2]
        with torch.no_grad():
            scores, ids = self._search(q.reshape(-1, self.heads, self.dim_key), segments, mask, k)
        return scores.view(*lead, self.heads, k), ids.view(*lead, self.heads, k)

    # ---------------------------------------------------------------- retrieval
    def _searched(
        self, x: torch.Tensor, owners: Owners, need: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segments that ``owners`` may search and an optional (T, S) mask; checks both."""
        check_input(x, self.dim)
        pool, need = self.pool, self.topk if need is None else need
        keep, mask = select_segments(owners, pool.segment_owner, tuple(x.shape[:-1]))
        sizes = pool.segments[:, 1] * pool.segments[:, 2]  # (S,)
        if keep is not None:
            held = int(sizes[keep].sum())
        elif mask is not None and len(mask):
            held = int((mask * sizes[None, :]).sum(dim=1).min())
        else:
            held = int(sizes.sum())
        if held < need:
            raise ValueError(f"owners must hold at least topk={need} experts, got owners "
                             f"{owners!r} holding {held}")
        return (pool.segments if keep is None else pool.segments[keep]), mask

    def _search(self, q, segments, mask, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (T, H, k) of q (T, H, d) over ``segments``, per-owner query if adapted."""
        keys = self.pool.sub_keys
        if self.query_adapter is None:
            return product_topk(q, keys, segments, k, segment_mask=mask, backend=self.backend)
        seg_owner = self.pool.expert_owner[segments[:, 3]]
        scores, ids = [], []
        for owner in seg_owner.unique().tolist():  # a loop over owners, not tokens
            keep = seg_owner == owner
            s, i = product_topk(self.query_adapter(q, owner), keys, segments[keep], k,
                                segment_mask=None if mask is None else mask[:, keep],
                                backend=self.backend)
            scores.append(s)
            ids.append(i)
        scores, pick = torch.cat(scores, dim=-1).topk(k, dim=-1)
        return scores, torch.cat(ids, dim=-1).gather(-1, pick)

    def _scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Differentiable scores (T, H, K) of ``ids``; gradients reach q and unfrozen keys."""
        left, right = self.pool.key_rows(ids)  # (T, H, K) each
        keys, frozen = self.pool.sub_keys, self.pool.key_frozen

        def score(query):
            return selected_scores(query, keys, left, right, frozen=frozen, backend=self.backend)

        if self.query_adapter is None:
            return score(q)
        owner_of = self.pool.expert_owner[ids.clamp(min=0)]
        out = None
        for owner in owner_of.unique().tolist():
            s = score(self.query_adapter(q, owner))
            out = s if out is None else torch.where(owner_of == owner, s, out)
        return out

    def attach_query_adapter(self, module: nn.Module) -> None:
        """Score owner o's sub-keys with ``module(q, o)``: q (T, H, d) -> (T, H, d).

        Configuration, set once (like PEFT injecting an adapter). The module must
        accept every owner present (the identity for an unknown owner is fine).
        """
        check_type("module", module, nn.Module)
        if self.query_adapter is not None:
            raise ValueError("query_adapter must be unset to attach one, got "
                             f"{type(self.query_adapter).__name__} already attached")
        weight = self.to_query.weight
        self.query_adapter = module.to(device=weight.device, dtype=weight.dtype)
        self._sync_adapter()

    # ------------------------------------------------------------ growth, freezing
    def grow(self, num_keys: int, *, owner: int, num_keys_right: int | None = None) -> torch.Tensor:
        """Append one product-key segment of num_keys × num_keys new experts.

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
        ids = self.pool.grow(num_keys, owner=owner, num_keys_right=num_keys_right)
        self.stats.resize(self.pool.capacity)
        return ids

    def reserve(self, capacity: int, key_capacity: int | None = None) -> None:
        """Reserve room for ``capacity`` experts and ``key_capacity`` sub-keys."""
        self.pool.reserve(capacity, key_capacity)
        self.stats.resize(self.pool.capacity)

    def freeze(self, owners=None, *, keys: bool = True, query: bool = False) -> None:
        """Freeze the experts of ``owners`` (None: all; [] : none), and optionally more.

        Frozen rows get no gradient, no optimizer moment and no weight decay from
        :func:`peer_ll.optim.make_optimizer` (a stock optimizer such as
        ``torch.optim.AdamW`` still decays them).

        Args:
            owners: an owner id, an iterable of ids, or None for every owner.
            keys: also freeze those segments' sub-keys (and their query adapters).
            query: also freeze the query network (and use the norm's running
                statistics, so queries no longer depend on the batch).
        """
        self._set_frozen(owners, True, keys, query)

    def unfreeze(self, owners=None, *, keys: bool = True, query: bool = True) -> None:
        """Undo :meth:`freeze` for ``owners`` (None: all)."""
        self._set_frozen(owners, False, keys, query)

    def _set_frozen(self, owners, value: bool, keys: bool, query: bool) -> None:
        self.pool.set_frozen(self.pool.segments_of(owners), value, keys=keys)
        if query:
            self.query_frozen = value
            for p in [*self.to_query.parameters(), *self.query_norm.parameters()]:
                p.requires_grad_(not value)
        self._sync_adapter()

    def _sync_adapter(self) -> None:
        """An owner's query adapter trains exactly when some of its sub-keys do."""
        set_trainable = getattr(self.query_adapter, "set_trainable", None)
        if set_trainable is None:
            return
        pool = self.pool
        for owner in set(pool.segment_owner.tolist()):
            rows = pool.segments[pool.segment_owner == owner][:, 0]
            set_trainable(owner, not bool(pool.key_frozen[rows].all()))

    # ------------------------------------------------------------ pool and stats
    owners = property(lambda self: self.pool.expert_owner[: self.num_experts],
                      doc="(N,) int64: the owner of every expert.")
    frozen = property(lambda self: self.pool.expert_frozen[: self.num_experts],
                      doc="(N,) bool: which experts are frozen.")
    num_experts = property(lambda self: self.pool.num_experts, doc="Experts in the pool.")
    num_segments = property(lambda self: len(self.pool.segments), doc="Segments (S).")
    segments = property(lambda self: self.pool.segments, doc="(S, 4) segment table.")
    segment_owner = property(lambda self: self.pool.segment_owner, doc="(S,) owners.")
    capacity = property(lambda self: self.pool.capacity, doc="Expert rows reserved.")
    expert_mass = property(lambda self: self.stats.mass[: self.num_experts],
                           doc="(N,) router mass accumulated per expert since the reset.")
    # The pool's tables and masks, for optimizers, plugins and kernels that take them.
    down = property(lambda self: self.pool.down, doc="(capacity, D) expert input weights.")
    up = property(lambda self: self.pool.up, doc="(capacity, E) expert output weights.")
    sub_keys = property(lambda self: self.pool.sub_keys, doc="(key_capacity, 2, d/2) keys.")
    expert_frozen = property(lambda self: self.pool.expert_frozen, doc="(capacity,) bool.")
    key_frozen = property(lambda self: self.pool.key_frozen, doc="(key_capacity,) bool.")
    key_capacity = property(lambda self: self.pool.key_capacity, doc="Sub-key rows reserved.")
    num_sub_keys = property(lambda self: self.pool.num_sub_keys, doc="Sub-key rows in use.")
    router_mass = property(lambda self: self.stats.mass, doc="(capacity,) router mass.")
    replaced_parameters = property(
        lambda self: self.pool.replaced_parameters,
        lambda self, value: setattr(self.pool, "replaced_parameters", value),
        doc="{name: (old, new)} Parameters replaced by the last reallocation.",
    )
    track_routing = property(
        lambda self: self.stats.track,
        lambda self, value: setattr(self.stats, "track", bool(value)),
        doc="Whether forwards add their gates to the router mass.",
    )

    def key_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-key rows (left, right) of expert ``ids``; same shape as ``ids``."""
        return self.pool.key_rows(ids)

    def expert_keys(self) -> torch.Tensor:
        """(N, d) full product key ``[c_a; c'_b]`` of every expert, row i for expert i."""
        return self.pool.expert_keys()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of (down (N, D), up (N, E)) for the experts in use (no gradient)."""
        n = self.num_experts
        return self.pool.down.detach()[:n], self.pool.up.detach()[:n]

    def routing_stats(self) -> dict[str, float]:
        """``{"usage", "unevenness", "mass"}`` of the mass accumulated since the reset."""
        return self.stats.summary(self.num_experts)

    def reset_routing_stats(self) -> None:
        """Zero the accumulated router mass."""
        self.stats.reset()

    @torch.no_grad()
    def retrieval_confidence(self, x: torch.Tensor, owners: Owners = None) -> dict:
        """Per-token retrieval confidence: (..., D) -> dict of (..., H) tensors.

        ``margin``: the k-th minus the (k+1)-th best score (NaN when the searched
        pool holds only k experts). ``gate_entropy``: entropy of the gates over the
        k retrieved experts (for sigmoid gates, of the normalised gates).
        """
        k = self.topk
        scores, _ = self.retrieve(x, owners, k=k + 1)  # a missing (k+1)-th scores -inf
        margin = scores[..., k - 1] - scores[..., k]
        top = scores[..., :k]
        gates = top.softmax(-1) if self.gate == "softmax" else top.sigmoid()
        gates = gates / gates.sum(-1, keepdim=True)
        margin = torch.where(torch.isfinite(margin), margin, torch.full_like(margin, math.nan))
        return {"margin": margin, "gate_entropy": -torch.xlogy(gates, gates).sum(-1)}

    # --------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _upgrade_checkpoint(state_dict, prefix)
        self.pool.check_checkpoint(state_dict, prefix + "pool.")  # before anything loads
        if any(k.startswith(prefix + "query_adapter.") for k in state_dict) and (
            self.query_adapter is None
        ):
            raise ValueError(f"{prefix}query_adapter must be attached to load the checkpoint's "
                             "query adapters (attach_query_adapter), got None")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _after_load(self, incompatible) -> None:
        self.stats.resize(self.pool.capacity)
        self.pool.tag()
        self._sync_adapter()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, topk={self.topk}, "
            f"dim_key={self.dim_key}, num_experts={self.num_experts}, "
            f"segments={self.num_segments}, capacity={self.capacity}, "
            f"query_norm={self.query_norm_kind!r}, gate={self.gate!r}, "
            f"activation={self.activation!r}"
        )


def _upgrade_checkpoint(state_dict: dict, prefix: str) -> None:
    """Rename the keys of checkpoints saved before the pool was a submodule, in place."""
    for name in list(state_dict):
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is None:
            continue
        if rest in _STORAGE:
            state_dict[prefix + "pool." + rest] = state_dict.pop(name)
        elif rest.startswith("query_adapters."):
            state_dict[prefix + "query_adapter." + rest[len("query_adapters."):]] = (
                state_dict.pop(name))
        elif rest.startswith("query_stats."):  # per-owner statistics: now peer_ll.protect's
            logger.info("ignoring %s: a PEER layer keeps no query statistics", name)
            state_dict.pop(name)


def peer_layers(model: nn.Module) -> dict[str, PEER]:
    """Every PEER layer inside ``model`` (itself included), by module name.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: it holds no PEER layer.
    """
    check_type("model", model, nn.Module)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PEER)}
    if not layers:
        raise ValueError(f"model must contain PEER layers, got a {type(model).__name__} "
                         "without any")
    return layers
