"""ExpertsModel: a torch / Hugging Face model with PEER experts beside its feed-forward blocks.

``add_experts(model, num_keys=..., owner=1)`` wraps every targeted block in an
:class:`~peer_ll.adapters.branch.ExpertBranch` (built by :mod:`peer_ll.adapters.targets`)
whose PEER layer holds the new domain's experts, output weights zero: the model computes
what it did. Only the new domain's experts, sub-keys and low-rank deltas
(``ExpertsConfig.adapter_rank``) train, and for the first domain the query networks; a
later ``add_experts(..., owner=2)`` grows each PEER layer by one segment and freezes the
rest. Owners travel as :meth:`ExpertsModel.forward`'s ``owners`` argument, set for one
call by :func:`~peer_ll.adapters.branch.owners_scope`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from peer_ll.adapters.branch import ExpertBranch, Owners, owners_scope
from peer_ll.adapters.config import ExpertsConfig
from peer_ll.adapters.counts import parameter_counts
from peer_ll.adapters.posterior import (
    domain_outputs,
    infer_forward,
    insured_domain_mixture,
    posterior_mixture,
)
from peer_ll.adapters.targets import activation_checkpointing, build_branches
from peer_ll.experts import PEER, PerOwner
from peer_ll.experts.checks import check_int, check_owner, check_type

logger = logging.getLogger(__name__)


class ExpertsModel(nn.Module):
    """A model with PEER branches, one owner (domain) per growth, PEFT-style.

    Build it with :func:`add_experts`. ``base_model`` is the wrapped model (its
    targeted blocks replaced by branches); :meth:`unload` gives it back as it was.

    Args:
        model: any ``nn.Module``; a Hugging Face causal LM for ``owners="infer"``.
        config: where the branches go and their shape.
    """

    def __init__(self, model: nn.Module, config: ExpertsConfig) -> None:
        super().__init__()
        check_type("model", model, nn.Module)
        check_type("config", config, ExpertsConfig)
        if config.domains:
            raise ValueError(f"config.domains must be empty for a new model, got {config.domains}")
        self.targets = [n for n, m in model.named_modules() if n and config.matches(n)]
        if not self.targets:
            raise ValueError(
                f"target_modules must match a module of {type(model).__name__}, "
                f"got {config.target_modules!r}"
            )
        inside = tuple(t + "." for t in self.targets)
        self.adapted = [n for n, _ in model.named_modules()
                        if n and config.adapts(n) and not n.startswith(inside)]  # fmt: skip
        if config.adapter_rank and not self.adapted:
            raise ValueError(
                f"adapter_modules must match a module of {type(model).__name__}, "
                f"got {config.adapter_modules!r}"
            )
        self.base_model = model
        self.config = config

    # ------------------------------------------------------------------ owners
    def branches(self) -> dict[str, ExpertBranch]:
        """The PEER branches by module name (empty before the first domain)."""
        return self._wrapped(PEER)

    def low_rank(self) -> dict[str, ExpertBranch]:
        """Per-domain low-rank delta branches (experts: a PerOwner) by module name, or {}."""
        return self._wrapped(PerOwner)

    def _wrapped(self, kind: type) -> dict[str, ExpertBranch]:
        return {
            n: m
            for n, m in self.base_model.named_modules()
            if isinstance(m, ExpertBranch) and isinstance(m.experts, kind)
        }

    @property
    def owners(self) -> list[int]:
        """The base owner, then every domain's owner in training order."""
        return [self.config.base_owner, *(o for o, _ in self.config.domains)]

    def add_experts(self, num_keys: int, *, owner: int) -> None:
        """Give domain ``owner`` num_keys² experts in every branch; freeze everything else.

        Args:
            num_keys: sub-keys per side of the new segment.
            owner: a new owner id, larger than every present one.
        """
        check_int("num_keys", num_keys, minimum=1)
        owner = check_owner("owner", owner)
        if owner <= max(self.owners):
            raise ValueError(f"owner must be an int > {max(self.owners)}, got {owner}")
        cfg = self.config
        if cfg.topk > num_keys * num_keys:
            raise ValueError(f"num_keys must give >= topk={cfg.topk} experts, got {num_keys}")
        if not cfg.domains:  # build every branch first: a failure changes nothing
            self._put(build_branches(self.base_model, cfg, self.targets, self.adapted,
                                     num_keys=num_keys, owner=owner))  # fmt: skip
        else:
            for branch in self.branches().values():
                branch.experts.grow(num_keys, owner=owner)
        for branch in self.branches().values():
            layer = branch.experts
            with torch.no_grad():  # zero output weights: the model is unchanged
                layer.up[layer.num_experts - num_keys * num_keys : layer.num_experts] = 0.0
        for delta in self.low_rank().values():
            delta.experts.add_owner(owner)  # (the first domain's came with the branch)
        cfg.domains.append([owner, num_keys])
        self._freeze_old(owner)

    def _put(self, modules: dict[str, nn.Module]) -> None:
        """Set each named submodule of the base model to the module given."""
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, module)

    def _freeze_old(self, owner: int) -> None:
        """Only ``owner``'s experts and sub-keys train (and the query nets for the first)."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        first = len(self.config.domains) == 1
        for branch in self.branches().values():
            layer = branch.experts
            old = sorted(set(layer.segment_owner.tolist()) - {owner})
            if old:
                layer.freeze(old, keys=True, query=True)
            layer.unfreeze(owner, keys=True, query=first)
            for p in (layer.down, layer.up, layer.sub_keys):
                p.requires_grad_(True)
        for delta in self.low_rank().values():
            delta.experts.freeze([owner], frozen=False)

    def freeze_all(self) -> None:
        """Freeze every expert, sub-key and query network (for inference)."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for branch in self.branches().values():
            branch.experts.freeze(None, keys=True, query=True)

    def unload(self) -> nn.Module:
        """Put the original blocks back and return the base model (the experts are dropped)."""
        self._put({name: branch.base for name, branch in self._wrapped(nn.Module).items()})
        return self.base_model

    # ----------------------------------------------------------------- forward
    def forward(
        self, *args, owners: Owners | str = None, confidence: float | None = None, **kwargs
    ):
        """Call the base model with every branch routed by ``owners``.

        Args:
            *args, **kwargs: the base model's arguments (``input_ids``, ``labels``...).
            owners: None (every domain's experts), the base owner (the model as it
                was, bit for bit), a domain's owner, a sequence of owners, an int
                tensor with one owner per sequence (B,) or position (B, T), or
                "infer" (a Hugging Face causal LM only: the domains' predictions
                mixed by their causal posterior, see :meth:`domain_posterior`).
            confidence: with "infer", insurance (off by default): every domain's route
                runs only until one domain's posterior reaches ``confidence``, then that
                route alone (:meth:`insured_mixture`).

        Returns:
            The base model's output; with "infer", an output of the same class with
            ``logits`` (B, T, V) the mixture's log-probabilities and ``loss``.
        """
        if isinstance(owners, str):
            if owners != "infer":
                raise ValueError(f'owners must be an owner id, None or "infer", got {owners!r}')
            return infer_forward(
                self.base_model, self.owners, *args, confidence=confidence, **kwargs
            )
        if confidence is not None:
            raise ValueError(f'confidence must be None unless owners="infer", got {confidence!r}')
        if self.training and activation_checkpointing(self.base_model):
            raise ValueError(
                "gradient checkpointing must be off: its recomputation runs outside the "
                "owners' scope; got a model with gradient checkpointing on"
            )
        with owners_scope(owners):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, owners: Owners = None, **kwargs):
        """The base model's ``generate`` with every branch routed by ``owners``."""
        with owners_scope(owners):
            return self.base_model.generate(*args, **kwargs)

    def domain_logits(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """(O, B, T, V): every owner's next-token logits, in :attr:`owners` order."""
        return domain_outputs(self.base_model, self.owners, input_ids, **kwargs)[0]

    def domain_posterior(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """(O, B, T): the posterior over :attr:`owners` at each position, causal.

        See :mod:`peer_ll.adapters.posterior`; costs one forward per owner.
        """
        with torch.no_grad():
            return posterior_mixture(self.domain_logits(input_ids, **kwargs), input_ids)[1].exp()

    def insured_mixture(
        self,
        input_ids: torch.Tensor,
        confidence: float = 0.99,
        *,
        probe: int = 8,
        prior=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (B, T, V) and routes per token (B,) with insurance.

        :func:`peer_ll.models.insurance.insured_mixture` on this model's posterior mixture;
        ``prior`` (e.g. an ``NgramDomainPrior``, in :attr:`owners`' order) runs only the
        routes it cannot rule out; ``kwargs`` go to the base model.
        """
        return insured_domain_mixture(
            self.base_model, self.owners, input_ids, confidence, probe=probe, prior=prior, **kwargs
        )

    # -------------------------------------------------------------- parameters
    def parameter_counts(self) -> dict[str, int]:
        """{"trainable", "added", "total"}: see :func:`peer_ll.adapters.counts.parameter_counts`."""
        return parameter_counts(self.base_model, self.branches().values(), self.low_rank().values())

    def print_trainable_parameters(self) -> str:
        """PEFT's summary line, logged at INFO and returned (library code does not print)."""
        c = self.parameter_counts()
        line = (
            f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
            f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f}"
        )
        logger.info(line)
        return line

    # ------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory) -> None:
        """Write only the experts (safetensors, config as JSON metadata) to ``directory``."""
        from peer_ll.adapters.checkpoint import save_adapter

        save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, *, is_trainable: bool = False):
        """Add the experts saved by :meth:`save_pretrained` to ``model`` (the same base).

        With ``is_trainable`` the newest domain trains, as after :func:`add_experts`;
        otherwise everything is frozen.
        """
        from peer_ll.adapters.checkpoint import load_adapter

        return load_adapter(cls, model, directory, is_trainable=is_trainable)


def add_experts(
    model: nn.Module,
    config: ExpertsConfig | None = None,
    *,
    num_keys: int,
    owner: int,
    target_modules=None,
) -> ExpertsModel:
    """Add PEER experts for domain ``owner`` beside each targeted feed-forward block.

    The first call wraps ``model`` (changing its targeted blocks in place) in an
    :class:`ExpertsModel`; a call on an ExpertsModel grows it by one domain.

    Args:
        model: a torch / Hugging Face model, or an ExpertsModel to grow.
        config: branch shape (default :class:`ExpertsConfig`); first call only.
        num_keys: sub-keys per side: the domain gets num_keys² experts per branch.
        owner: the new domain's owner id (> every present owner; the base is 0).
        target_modules: overrides ``config.target_modules``; first call only.

    Returns:
        The ExpertsModel, with only the new domain's experts trainable.
    """
    if isinstance(model, ExpertsModel):
        if config is not None or target_modules is not None:
            raise ValueError(
                "config and target_modules must be None when growing an ExpertsModel, got "
                f"config={config!r}, target_modules={target_modules!r}"
            )
        model.add_experts(num_keys, owner=owner)
        return model
    config = ExpertsConfig() if config is None else dataclasses.replace(config, domains=[])
    if target_modules is not None:
        config = dataclasses.replace(config, target_modules=target_modules)
    check_int("num_keys", num_keys, minimum=1)
    check_owner("owner", owner)
    wrapped = ExpertsModel(model, config)
    wrapped.add_experts(num_keys, owner=owner)
    return wrapped
