"""PEER: Parameter Efficient Expert Retrieval with a growable pool of experts.

He, *Mixture of A Million Experts*, arXiv 2407.04153 (2024). Axis letters:
``T`` tokens, ``H`` heads, ``K`` top-k, ``D`` dim, ``E`` dim_out, ``d`` dim_key,
``S`` segments, ``N`` experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.experts.checks import check_choice, check_input, check_int, check_owner
from peer_ll.experts.owner_routing import OwnerRoutingMixin
from peer_ll.experts.owner_stats import COVARIANCES, OwnerQueryStats
from peer_ll.experts.pool import ExpertPool
from peer_ll.experts.routing import RoutingStatsMixin
from peer_ll.kernels.expert_mix import expert_mix
from peer_ll.kernels.product_topk import product_topk

QUERY_NORMS = ("batch", "layer", None)
GATES = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "relu")

Owners = int | Sequence[int] | torch.Tensor | str | None


class PEER(OwnerRoutingMixin, ExpertPool, RoutingStatsMixin, nn.Module):
    r"""A PEER layer whose expert pool grows by segments, one owner per segment.

    For x in R^D, with h heads and product keys shared by all heads:

    - query ``q = norm(W_q x)``, one query of size ``dim_key`` per head;
    - per head, exact top-k over all experts' keys ``[c_a; c'_b]`` by product-key
      search (per-half top-k, k² candidate sums, final top-k), inside every segment,
      merged over segments;
    - gates ``g = softmax(top-k scores)``;
    - output ``f(x) = Σ_heads Σ_{i ∈ top-k} g_i · σ(u_iᵀ x) · v_i`` (no biases).

    Paper defaults: N = 1024² experts (``num_keys=1024``), h = 8 heads, k = 16,
    dim_key = 128, BatchNorm on queries, softmax gates, GELU experts.

    Departures from the paper, all opt-in:
        ``query_norm="layer"`` or ``None``: BatchNorm mixes statistics across the
        positions of a causal language model, which leaks future tokens.
        ``gate="sigmoid"``: independent gates instead of a softmax over the k scores.
        ``activation="relu"``: ReLU experts instead of GELU.

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
        capacity: expert rows to reserve (default: exactly num_keys²). Growth
            within capacity allocates nothing and keeps every Parameter object.
        key_capacity: sub-key rows to reserve (default: enough for ``capacity``
            experts in segments of ``num_keys`` sub-keys per side).
        owner: owner id of the first segment's experts.
        sparse_grad: give the expert tables row-sparse gradients (needs
            ``peer_ll.optim.make_optimizer`` or another sparse-aware optimizer).
        backend: kernels to use, "auto" | "torch" | "triton".
        query_stats: per-owner query statistics, "diag" | "full" | None (off); see
            :class:`~peer_ll.experts.owner_stats.OwnerQueryStats`.
        query_adapter_rank: rank of a per-owner query adapter (0: none, paper).
        query_adapter_affine: give each owner a per-dimension query scale and shift;
            see :mod:`peer_ll.experts.owner_adapters`.

    Owner protection (not in the paper; defaults leave the paper's layer unchanged):
        ``training_owner``: whose query statistics training-mode forwards update:
        "newest" (default: the owner of the newest segment, unless its experts are
        frozen), an int, or None (never). ``recording_owner``: if set, every forward
        records for it (see ``recording_query_stats``). ``owner_inference``: the
        ``owners="infer"`` hook; ``eval_owners``: owners used by eval-mode forwards
        and ``retrieve`` calls that pass ``owners=None`` (set both with
        ``peer_ll.experts.set_owner_inference``).

    Shapes:
        input (..., D) -> output (..., E).
    """

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
        key_capacity: int | None = None,
        owner: int = 0,
        sparse_grad: bool = True,
        backend: str = "auto",
        query_stats: str | None = "diag",
        query_adapter_rank: int = 0,
        query_adapter_affine: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        check_int("dim", dim, minimum=1)
        dim_out = dim if dim_out is None else check_int("dim_out", dim_out, minimum=1)
        check_int("num_keys", num_keys, minimum=1)
        check_int("heads", heads, minimum=1)
        check_int("topk", topk, minimum=1)
        check_int("dim_key", dim_key, minimum=2)
        if dim_key % 2:
            raise ValueError(f"dim_key must be even (it splits into two halves), got {dim_key}")
        if topk > num_keys * num_keys:
            raise ValueError(
                f"topk must be <= the pool size num_keys**2 = {num_keys * num_keys}, got {topk}"
            )
        check_choice("query_norm", query_norm, QUERY_NORMS)
        check_choice("gate", gate, GATES)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, ("auto", "torch", "triton"))
        check_choice("query_stats", query_stats, (*COVARIANCES, None))
        check_int("query_adapter_rank", query_adapter_rank, minimum=0)
        owner = check_owner("owner", owner)
        first = num_keys * num_keys
        capacity = first if capacity is None else check_int("capacity", capacity, minimum=first)
        if key_capacity is None:
            key_capacity = max(num_keys, math.ceil(capacity / num_keys))
        check_int("key_capacity", key_capacity, minimum=num_keys)

        self.dim, self.dim_out, self.heads, self.topk, self.dim_key = (
            dim, dim_out, heads, topk, dim_key,
        )
        self.num_keys = num_keys
        self.query_norm_kind, self.gate, self.activation = query_norm, gate, activation
        self.sparse_grad, self.backend = sparse_grad, backend
        self.track_routing = True

        self.to_query = nn.Linear(dim, heads * dim_key, bias=False)
        if query_norm == "batch":
            self.query_norm = nn.BatchNorm1d(heads * dim_key)
        elif query_norm == "layer":
            self.query_norm = nn.LayerNorm(dim_key)
        else:
            self.query_norm = nn.Identity()
        self._init_pool(capacity, key_capacity)
        self.query_stats = None if query_stats is None else OwnerQueryStats(
            heads, dim_key, covariance=query_stats)
        self.training_owner: int | str | None = "newest"
        self.recording_owner: int | None = None
        self.owner_inference = None
        self.eval_owners: Owners = None
        self.last_inferred_owners: torch.Tensor | None = None
        self._init_adapters(query_adapter_rank, bool(query_adapter_affine))
        self._append_segment(num_keys, owner)
        self._add_adapter(owner)

    # ------------------------------------------------------------------ forward
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries after the norm: (..., D) -> (..., H, d)."""
        check_input(x, self.dim)
        lead = x.shape[:-1]
        q = self.to_query(x.reshape(-1, self.dim))  # (T, H*d)
        if self.query_norm_kind == "batch":
            bn = self.query_norm
            # A frozen query network normalises with its running statistics only.
            training = bn.training and not self.query_frozen
            q = F.batch_norm(
                q, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, bn.momentum,
                bn.eps,
            )
        q = q.view(-1, self.heads, self.dim_key)  # (T, H, d)
        if self.query_norm_kind == "layer":
            q = self.query_norm(q)
        return q.view(*lead, self.heads, self.dim_key)

    def retrieve(
        self, x: torch.Tensor, owners: Owners = None, *, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k retrieval without gradient: (..., D) -> scores, ids, each (..., H, k)."""
        q = self.query(x)
        lead = q.shape[:-2]
        k = self.topk if k is None else check_int("k", k, minimum=1)
        owners = self._resolve_owners(owners)
        with torch.no_grad():
            scores, ids = self._search(q.reshape(-1, self.heads, self.dim_key), owners, x, k)
        return scores.view(*lead, self.heads, k), ids.view(*lead, self.heads, k)

    def forward(self, x: torch.Tensor, owners: Owners = None) -> torch.Tensor:
        """Apply the layer: (..., D) -> (..., E).

        Args:
            x: (..., D) floating inputs.
            owners: restrict retrieval to these owners' experts: None (all, or
                ``eval_owners`` in eval mode), "all", an int, a sequence of ints, an
                int tensor of shape (...) giving one owner per input, or "infer"
                (``owner_inference``, by default the query likelihood under each
                owner's statistics).
        """
        q = self.query(x)  # (..., H, d)
        lead = q.shape[:-2]
        q = q.reshape(-1, self.heads, self.dim_key)  # (T, H, d)
        owners = self._resolve_owners(owners)
        self._record_query_stats(q, owners)
        flat = x.reshape(-1, self.dim)
        if isinstance(owners, str) and owners == "infer" and getattr(
            self.owner_inference, "soft", False
        ):
            owner_ids, weights = self.owner_inference.mixture(self, x, q.detach())  # (T, M)
            out = sum(
                self._mix(flat, q, owner_ids[:, m], flat, weights[:, m]) * weights[:, m, None]
                for m in range(owner_ids.shape[1])
            )
        else:
            out = self._mix(flat, q, owners, x)
        return out.view(*lead, self.dim_out)

    def _mix(self, flat, q, owners, x, weight=None) -> torch.Tensor:
        """Retrieve for ``owners`` and mix: flat (T, D), q (T, H, d) -> (T, E).

        ``x`` is the input as ``owners`` sees it; ``weight`` (T,) scales routing mass.
        """
        with torch.no_grad():
            _, ids = self._search(q.detach(), owners, x, self.topk)  # (T, H, K)
        scores = self._owner_scores(q, ids)  # (T, H, K), differentiable
        gates = scores.softmax(dim=-1) if self.gate == "softmax" else scores.sigmoid()
        if self.track_routing:
            mass = gates.detach() if weight is None else gates.detach() * weight[:, None, None]
            self.record_routing(ids, mass)
        self._tag_parameters()
        return expert_mix(
            flat,
            ids,
            gates,
            self.down,
            self.up,
            activation=self.activation,
            frozen=self.expert_frozen,
            sparse_grad=self.sparse_grad,
            backend=self.backend,
        )

    def selected_scores(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Differentiable scores of the retrieved experts: q (T,H,d), ids (T,H,K) -> (T,H,K).

        Costs T·H·K·d; gradients reach the query and the sub-keys of unfrozen
        segments.
        """
        from peer_ll.kernels.selected_scores import selected_scores

        left, right = self.key_rows(ids)  # (T, H, K) each
        return selected_scores(
            q, self.sub_keys, left, right, frozen=self.key_frozen, backend=self.backend
        )

    # ---------------------------------------------------------------- retrieval
    def _search(
        self, q: torch.Tensor, owners: Owners, x: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        segments, mask = self._segments_for(owners, x, q)
        if len(self.query_adapters):
            return self._adapted_search(q, segments, mask, k)
        return product_topk(
            q, self.sub_keys, segments, k, segment_mask=mask, backend=self.backend
        )

    def _segments_for(
        self, owners: Owners, x: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Segments to search and an optional per-token (T, S) mask for ``owners``."""
        segments, seg_owner = self.segments, self.segment_owner
        sizes = segments[:, 1] * segments[:, 2]
        if owners is None or (isinstance(owners, str) and owners == "all"):
            return segments, None
        if isinstance(owners, str):
            if owners != "infer":
                raise ValueError(
                    "owners must be None, \"all\", \"infer\", an int, a sequence of ints or "
                    f"an int tensor; got {owners!r}"
                )
            inference = getattr(self, "owner_inference", None)
            if inference is None:  # default: the query likelihood under each owner's stats
                if self.query_stats is None:
                    raise ValueError(
                        'owners="infer" needs per-owner query statistics (query_stats="diag" '
                        'or "full") or an owner inference (set_owner_inference); this layer '
                        "has neither"
                    )
                from peer_ll.experts.owner_inference import OwnerInference

                inference = OwnerInference("likelihood")
            return inference(self, x, q)
        present = set(seg_owner.tolist())
        if isinstance(owners, torch.Tensor) and owners.dim() > 0:
            if owners.is_floating_point() or owners.dtype == torch.bool:
                raise TypeError(f"owners tensor must have an integer dtype, got {owners.dtype}")
            lead = x.shape[:-1]
            if tuple(owners.shape) != tuple(lead):
                raise ValueError(
                    f"owners tensor must have shape {tuple(lead)} (one per input), "
                    f"got {tuple(owners.shape)}"
                )
            flat = owners.reshape(-1).to(seg_owner.device)
            missing = set(flat.unique().tolist()) - present
            if missing:
                raise ValueError(f"owners must be among {sorted(present)}, got {sorted(missing)}")
            mask = flat[:, None] == seg_owner[None, :]  # (T, S)
            allowed = (mask * sizes[None, :]).sum(dim=1).min()
            self._check_enough(int(allowed), owners="per-input owners")
            return segments, mask
        wanted = [owners] if not isinstance(owners, Sequence | torch.Tensor) else list(owners)
        wanted = {check_owner("owners", o) for o in wanted}
        missing = wanted - present
        if missing:
            raise ValueError(f"owners must be among {sorted(present)}, got {sorted(missing)}")
        keep = torch.tensor([o in wanted for o in seg_owner.tolist()], device=segments.device)
        self._check_enough(int(sizes[keep].sum()), owners=sorted(wanted))
        return segments[keep], None

    def _check_enough(self, allowed: int, *, owners: object) -> None:
        if allowed < self.topk:
            raise ValueError(
                f"topk={self.topk} experts are needed, but owners {owners} hold only {allowed}"
            )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, heads={self.heads}, topk={self.topk}, "
            f"dim_key={self.dim_key}, num_experts={self.num_experts}, "
            f"segments={self.num_segments}, capacity={self.capacity}, "
            f"query_norm={self.query_norm_kind!r}, gate={self.gate!r}, "
            f"activation={self.activation!r}"
        )
