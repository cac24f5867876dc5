"""Parts of PEERLM: its config and transformer blocks (some with PEER FFNs).

Axis letters: ``B`` batch, ``T`` positions, ``D`` model width, ``V`` vocabulary,
``h`` attention heads. The block is nanoGPT's pre-LayerNorm block; a PEER block
swaps the MLP for a :class:`peer_ll.experts.PEER` layer, as in the PEER paper
(He 2024, section 3), which replaces the FFN of a middle block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.experts import PEER, PerOwner, QueryAdapter
from peer_ll.experts.checks import check_bool, check_choice, check_float, check_int

GROWTH = ("branch", "pool")
Route = list[list[int]] | None  # owner groups; each group is one PEER retrieval, outputs summed


@dataclass
class LMConfig:
    """Configuration of :class:`peer_ll.models.PEERLM`; JSON-serialisable.

    The PEER defaults are smaller than the paper's (N = 1024², h = 8, k = 16,
    d = 128) so that the model trains on a CPU in minutes.
    """

    vocab_size: int = 258  # bytes + BOS + EOS (peer_ll.data.text.TEXT_VOCAB_SIZE)
    block_size: int = 128  # longest context, T
    dim: int = 128  # model width, D
    layers: int = 4
    attn_heads: int = 4
    mlp_ratio: int = 4  # hidden width of the dense FFNs, as a multiple of D
    peer_layers: tuple[int, ...] | None = None  # blocks with PEER FFNs; None: the middle one
    peer_num_keys: int = 32  # sub-keys per side of the first segment (paper: 1024)
    peer_heads: int = 4  # retrieval heads (paper: 8)
    peer_topk: int = 8  # experts per head (paper: 16)
    peer_dim_key: int = 64  # query/key size (paper: 128)
    # LayerNorm, not the paper's BatchNorm: BatchNorm's batch statistics mix all
    # positions of a batch, so a token's query would depend on future tokens.
    query_norm: str | None = "layer"
    peer_capacity: int | None = None  # expert rows to reserve for growth (None: the first segment)
    # How a grown domain's experts are used: "branch" (a separate retrieval added to the
    # base experts' one, new experts start as a no-op) or "pool" (they join one retrieval).
    growth: str = "branch"
    # With "branch" growth, dense-FFN blocks also grow experts: a PEER layer beside the
    # MLP, created at the first growth, that holds only grown domains' experts.
    grow_dense_blocks: bool = True
    # Per-owner query adapters of every PEER layer (a peer_ll.experts.PerOwner): a new
    # domain trains its own on a frozen shared query network (0 and False: none, paper).
    adapter_rank: int = 8
    adapter_affine: bool = True
    # Grown owners score their sub-keys with the first owner's query adapter instead of
    # their own: one query and one search over the pool (the base's, plus a segment per domain).
    shared_query_adapter: bool = False
    # With "branch" growth, a grown domain also owns rank-r deltas of every attention
    # projection, used only on its own route (0: none; attention stays as trained).
    attention_adapter_rank: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "dim", "layers", "attn_heads", "mlp_ratio"):
            check_int(name, getattr(self, name), minimum=1)
        if self.dim % self.attn_heads:
            raise ValueError(
                f"dim must be a multiple of attn_heads={self.attn_heads}, got {self.dim}"
            )
        if self.peer_layers is None:
            self.peer_layers = (self.layers // 2,)
        self.peer_layers = tuple(sorted(set(self.peer_layers)))
        bad = [i for i in self.peer_layers if not 0 <= i < self.layers]
        if bad or not self.peer_layers:
            raise ValueError(
                f"peer_layers must be block indices in [0, {self.layers}), got {self.peer_layers}"
            )
        check_choice("query_norm", self.query_norm, ("layer", None))  # BatchNorm leaks the future
        for name in ("peer_num_keys", "peer_heads", "peer_topk", "peer_dim_key"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("adapter_rank", "attention_adapter_rank"):
            check_int(name, getattr(self, name), minimum=0)
        check_bool("adapter_affine", self.adapter_affine)
        check_bool("shared_query_adapter", self.shared_query_adapter)
        check_bool("grow_dense_blocks", self.grow_dense_blocks)
        check_choice("growth", self.growth, GROWTH)
        check_float("dropout", self.dropout, minimum=0.0, maximum=0.999)

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        out = asdict(self)
        out["peer_layers"] = list(self.peer_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        """Builds a config from :meth:`to_dict` output; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected keys among {sorted(known)}")
        data = dict(data)
        if data.get("peer_layers") is not None:
            data["peer_layers"] = tuple(data["peer_layers"])
        return cls(**data)


class LowRankDelta(nn.Module):
    """A LoRA-style residual ``(x A) B``: (..., D) -> (..., E); B starts at zero."""

    def __init__(self, dim: int, dim_out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(dim, rank) / dim**0.5)
        self.up = nn.Parameter(torch.zeros(rank, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down) @ self.up


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: (B, T, D) -> (B, T, D).

    A grown domain may own low-rank deltas of the qkv and output projections
    (``adapters[str(owner)]``, see :meth:`add_adapter`); ``forward(x, owner)``
    applies that owner's, and no others, so other owners' attention is unchanged.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.heads, self.dropout = config.attn_heads, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.adapters = nn.ModuleDict()

    def add_adapter(self, owner: int, rank: int) -> None:
        """Give ``owner`` zero-initialised rank-``rank`` deltas of qkv and proj."""
        dim = self.proj.in_features
        adapter = nn.ModuleDict(
            {"qkv": LowRankDelta(dim, 3 * dim, rank), "proj": LowRankDelta(dim, dim, rank)}
        )
        self.adapters[str(owner)] = adapter.to(self.proj.weight.device)

    def forward(self, x: torch.Tensor, owner: int | None = None) -> torch.Tensor:
        B, T, D = x.shape
        adapter = self.adapters[str(owner)] if str(owner) in self.adapters else None
        qkv = self.qkv(x) if adapter is None else self.qkv(x) + adapter["qkv"](x)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, D/h)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y) if adapter is None else self.proj(y) + adapter["proj"](y)


class MLP(nn.Module):
    """The dense FFN: (B, T, D) -> (B, T, D)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.dim
        self.fc = nn.Linear(config.dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def make_peer(config: LMConfig, *, num_keys: int | None = None, owner: int = 0) -> PEER:
    """A PEER layer as ``config`` describes it (default: the base layer of owner 0).

    With ``config.adapter_rank`` or ``config.adapter_affine`` it carries per-owner
    query adapters (a :class:`peer_ll.experts.PerOwner` of
    :class:`peer_ll.experts.QueryAdapter`), one for ``owner``; with
    ``config.shared_query_adapter`` every later owner uses that one.
    """
    layer = PEER(
        config.dim,
        num_keys=config.peer_num_keys if num_keys is None else num_keys,
        heads=config.peer_heads,
        topk=config.peer_topk,
        dim_key=config.peer_dim_key,
        query_norm=config.query_norm,
        capacity=config.peer_capacity if num_keys is None else None,
        owner=owner,
    )
    if config.adapter_rank or config.adapter_affine:
        unknown = "first" if config.shared_query_adapter else "identity"

        def adapter() -> QueryAdapter:
            return QueryAdapter(
                config.peer_heads,
                config.peer_dim_key,
                rank=config.adapter_rank,
                affine=config.adapter_affine,
            )

        layer.attach_query_adapter(PerOwner(adapter(), owner=owner, new=adapter, unknown=unknown))
    return layer


def own_query_adapter(layer: PEER) -> bool:
    """Whether a new owner of ``layer`` gets a query adapter of its own (a PerOwner's copy)."""
    adapter = layer.query_adapter
    return isinstance(adapter, PerOwner) and adapter.unknown != "first"


def grow_peer(layer: PEER, num_keys: int, *, owner: int) -> torch.Tensor:
    """Grow ``layer`` by ``num_keys``² experts of ``owner`` (and its query adapter)."""
    ids = layer.grow(num_keys, owner=owner)
    if own_query_adapter(layer):
        layer.query_adapter.add_owner(owner)
    return ids


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x)).

    ``ffn`` is a dense MLP, or a PEER layer when ``peer`` is True. ``route`` is
    None (every expert in one retrieval) or a list of owner groups, the base group
    first: a PEER FFN runs one retrieval restricted to each group
    (``PEER(x, owners=group)``) and sums the outputs. A dense block computes its
    MLP for the base group and, once :meth:`grow_dense` gave it a ``grown`` PEER
    layer, one retrieval in it for each later group. The attention applies the
    adapter of owner ``adapter``, if it has one.
    """

    def __init__(self, config: LMConfig, *, peer: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim)
        self.ffn: nn.Module = make_peer(config) if peer else MLP(config)
        self.is_peer = peer
        self.grown: PEER | None = None
        self.drop = nn.Dropout(config.dropout)

    def grow_dense(self, config: LMConfig, num_keys: int, *, owner: int) -> None:
        """Give a dense block grown experts: a PEER layer whose first segment is ``owner``'s.

        Its shared query network stays frozen (owners train their query adapters),
        and its output weights start at zero, so it adds nothing until trained.
        """
        if self.is_peer:
            raise ValueError("block must be a dense block to grow_dense, got a PEER block")
        if self.grown is not None:
            grow_peer(self.grown, num_keys, owner=owner)
        else:
            self.grown = make_peer(config, num_keys=num_keys, owner=owner).to(
                self.ln_ffn.weight.device
            )
            self.grown.freeze(None, keys=False, query=True)
            self.grown.unfreeze(None, keys=False, query=False)

    def match_checkpoint(self, config: LMConfig, state_dict: dict, prefix: str) -> None:
        """Create the grown layer and attention adapters a checkpoint holds for this block."""
        head = prefix + "attn.adapters."
        for name, value in state_dict.items():
            if name.startswith(head) and name.endswith(".qkv.down"):
                owner = name[len(head) :].split(".")[0]
                if owner not in self.attn.adapters:
                    self.attn.add_adapter(int(owner), value.shape[1])
        owners = state_dict.get(
            prefix + "grown.pool.segment_owner", state_dict.get(prefix + "grown.segment_owner")
        )  # older layout
        segments = state_dict.get(
            prefix + "grown.pool.segments", state_dict.get(prefix + "grown.segments")
        )
        if owners is not None and segments is not None and self.grown is None:
            self.grow_dense(config, int(segments[0, 1]), owner=int(owners[0]))

    def forward(
        self, x: torch.Tensor, route: Route = None, adapter: int | None = None
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), adapter))
        h = self.ln_ffn(x)
        if route is None:
            return x + self.drop(self.ffn(h))
        if self.is_peer:
            out = self.ffn(h, owners=route[0])
            for group in route[1:]:
                out = out + self.ffn(h, owners=group)
        else:
            out = self.ffn(h)
            for group in route[1:] if self.grown is not None else ():
                out = out + self.grown(h, owners=group)
        return x + self.drop(out)
