"""ExpertsConfig: where PEER branches go, their shape, and the domains grown so far."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from peer_ll.experts.checks import (
    ACTIVATIONS,
    QUERY_NORMS,
    check_bool,
    check_choice,
    check_int,
    check_owner,
)

# GPT-2's and Llama's attention projections (module name suffixes).
ATTENTION_PROJECTIONS = (
    "attn.c_attn",
    "attn.c_proj",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
)


@dataclass
class ExpertsConfig:
    """Configuration of the PEER experts added to a model (saved with the adapter).

    Attributes:
        target_modules: which modules get a PEER branch. A string is a regular
            expression that must match a module's full name; a sequence of
            strings matches names equal to one of them or ending in ``.{name}``
            (PEFT's convention). Default ["mlp"]: GPT-2's ``transformer.h.{i}.mlp``
            and Llama's ``model.layers.{i}.mlp``.
        heads: retrieval heads h (paper: 8).
        topk: experts per head k (paper: 16).
        dim_key: query / key size (paper: 128).
        query_norm: "layer" (default: BatchNorm, the paper's, mixes statistics
            across the positions of a causal LM), "batch" or None.
        activation: "gelu" (paper) or "relu".
        base_owner: owner id of the model as it was; it owns no experts.
        sparse_grad: row-sparse gradients for the expert tables; train with
            :func:`peer_ll.optim.make_optimizer` (stock optimizers reject them).
        adapter_rank: rank of a per-domain low-rank delta on each projection named by
            ``adapter_modules`` (0: none). A domain's route applies its own delta
            only; the base domain's outputs stay the base model's bit for bit.
        adapter_modules: where the deltas go (PEFT's suffix convention); the
            default names GPT-2's and Llama's attention projections.
        domains: the growth history, ``[owner, num_keys]`` per domain in
            training order; filled by :meth:`ExpertsModel.add_experts`.
    """

    target_modules: str | Sequence[str] = field(default_factory=lambda: ["mlp"])
    heads: int = 8  # paper: h = 8
    topk: int = 16  # paper: k = 16
    dim_key: int = 128  # paper: 128
    query_norm: str | None = "layer"  # paper: "batch" (leaks future tokens in a causal LM)
    activation: str = "gelu"  # paper: GELU
    base_owner: int = 0
    sparse_grad: bool = True
    adapter_rank: int = 0
    adapter_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    domains: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(
                    f"target_modules must be a regular expression, got {targets!r} ({err})"
                ) from None
        elif not (
            isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise TypeError(
                f"target_modules must be a str or a non-empty sequence of str, got {targets!r}"
            )
        else:
            self.target_modules = list(targets)
        check_int("heads", self.heads, minimum=1)
        check_int("topk", self.topk, minimum=1)
        check_int("dim_key", self.dim_key, minimum=2)
        if self.dim_key % 2:
            raise ValueError(f"dim_key must be even, got {self.dim_key}")
        check_choice("query_norm", self.query_norm, QUERY_NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_owner("base_owner", self.base_owner)
        check_int("adapter_rank", self.adapter_rank, minimum=0)
        modules = self.adapter_modules
        if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
            raise TypeError(f"adapter_modules must be a sequence of str, got {modules!r}")
        self.adapter_modules = list(modules)
        check_bool("sparse_grad", self.sparse_grad)
        self.domains = [
            [check_owner("owner", o), check_int("num_keys", n, minimum=1)] for o, n in self.domains
        ]

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def adapts(self, name: str) -> bool:
        """Whether the module called ``name`` gets per-domain low-rank deltas."""
        return self.adapter_rank > 0 and any(
            name == m or name.endswith("." + m) for m in self.adapter_modules
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ExpertsConfig:
        """Build a config from :meth:`to_dict`'s output; unknown keys raise ValueError."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"values must have keys among {sorted(known)}, got {unknown}")
        return cls(**values)
