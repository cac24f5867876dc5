"""PEERLM: a small decoder-only language model whose middle FFNs are PEER layers.

The model grows by domain (owner). :meth:`PEERLM.grow` gives a new domain its
own experts, :meth:`PEERLM.freeze_old` freezes everything else (embeddings,
attention, norms, head, shared query networks, other domains' experts, sub-keys
and adapters). A domain's *route* says what its tokens use:

- growth "branch" (default, the grow-and-freeze method): domain 0 (the base)
  uses what it was trained with. Domain d > 0 adds, in every block, one
  retrieval restricted to its own experts (a new segment of the PEER pool, or of
  a PEER layer beside a dense MLP) and its own low-rank attention deltas. New
  output weights start at zero, so growth alone changes no route.
- growth "pool" (grow-only): new experts join the paper's single retrieval;
  domain d uses one retrieval over the experts of owners 0..d.

``model(idx, owners=0)`` computes exactly what the model computed before any
growth, whatever was trained later. ``owners="infer"`` needs no label: it mixes
the domains' predictions by their posterior given the context so far (see
:meth:`PEERLM.domain_posterior`).

Axis letters: ``B`` batch, ``T`` positions, ``D`` width, ``V`` vocabulary,
``O`` candidate domains.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from peer_ll.experts import PEER, peer_layers
from peer_ll.experts.checkpoint import load_or_restore
from peer_ll.models.insurance import insured_mixture, posterior_mixture
from peer_ll.models.lm_growth import (
    check_ids,
    domain_route,
    freeze_all_but,
    grow_domain,
    per_sequence_logits,
)
from peer_ll.models.lm_io import CHECKPOINT_FORMAT, load_model, sample, save_model
from peer_ll.models.transformer import Block, LMConfig, Route

LMOwners = int | str | torch.Tensor | None


class PEERLM(nn.Module):
    """Decoder-only transformer LM with PEER layers in place of some FFNs.

    Args:
        config: an :class:`LMConfig`; ``config.peer_layers`` names the PEER blocks
            (default: the middle one) and ``config.query_norm`` defaults to
            "layer", since BatchNorm leaks future tokens in a causal model.

    Shapes:
        idx (B, T) int64 token ids, T <= block_size -> logits (B, T, V).
    """

    def __init__(self, config: LMConfig | None = None) -> None:
        super().__init__()
        self.config = config = LMConfig() if config is None else config
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.block_size, config.dim)
        self.blocks = nn.ModuleList(
            Block(config, peer=i in config.peer_layers) for i in range(config.layers)
        )
        self.ln_out = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in GPT-2 / nanoGPT
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def peer_layers(self) -> list[PEER]:
        """The PEER layers, in depth order."""
        return [b.ffn for b in self.blocks if b.is_peer]

    @property
    def owners(self) -> list[int]:
        """Owner (domain) ids present in the PEER layers, ascending (= training order)."""
        return sorted(set(self.peer_layers[0].segment_owner.tolist()))

    def route(self, owner: int | None) -> Route:
        """The owner groups an ``owner``'s tokens retrieve from (None: every expert)."""
        return domain_route(self.owners, self.config.growth, owner)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        owners: LMOwners = None,
        confidence: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-token logits, and the mean cross-entropy when ``targets`` are given.

        Args:
            idx: (B, T) token ids.
            targets: optional (B, T) next-token ids; -1 entries are ignored.
            owners: None (every expert), a domain's owner id (its route: task-aware
                inference; domain 0 is the model before any growth), a (B,) integer
                tensor (one domain per sequence), or "infer" (the domains' posterior
                mixture, see :meth:`domain_posterior`).
            confidence: with ``owners="infer"``, insurance (:meth:`insured_mixture`):
                every route runs only until the posterior's top domain reaches this
                probability, then only that domain's route. None (default): every
                route for every token.

        Returns:
            logits (B, T, V) and the loss (a scalar) or None.
        """
        check_ids(idx, self.config)
        if isinstance(owners, str):
            if owners != "infer":
                raise ValueError(
                    f"owners must be None, 'infer', an owner id or a (B,) "
                    f"integer tensor, got {owners!r}"
                )
            if confidence is None:
                logits = self._mixture(idx)[0]  # log-probabilities: valid logits
            else:
                logits = self.insured_mixture(idx, confidence)[0]
        elif isinstance(owners, torch.Tensor):
            logits = self._per_sequence(idx, owners)
        else:
            logits = self._logits(idx, owners)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _per_sequence(self, idx: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) where sequence b takes the route of ``owners[b]``."""
        return per_sequence_logits(self._logits, idx, owners)

    def _logits(self, idx: torch.Tensor, owner: int | None) -> torch.Tensor:
        route = self.route(owner)
        # Attention adapters: only a grown domain's own route (never owner None) uses them.
        adapter = owner if owner is not None and owner != self.owners[0] else None
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x, route, adapter)
        return self.head(self.ln_out(x))  # (B, T, V)

    def infer_domains(self, idx: torch.Tensor) -> torch.Tensor:
        """The most probable domain of each position of ``idx`` (B, T): (B, T) owner ids.

        See :meth:`domain_posterior`; ties (position 0) go to the base domain.
        """
        with torch.no_grad():
            return torch.tensor(self.owners, device=idx.device)[self._mixture(idx)[1].argmax(0)]

    def domain_posterior(self, idx: torch.Tensor) -> torch.Tensor:
        """Posterior over domains at each position of ``idx`` (B, T): (O, B, T).

        Every domain's route scores the tokens seen so far (no token after t, so the
        model stays causal): see :func:`peer_ll.models.insurance.posterior_mixture`.
        ``owners="infer"`` predicts with this posterior's mixture (Bayesian model
        averaging, in the spirit of Expert Gate, Aljundi et al. 2017, with the LM's own
        likelihood as the gate). Costs one forward per domain.
        """
        with torch.no_grad():
            return self._mixture(idx)[1].exp()

    def insured_mixture(
        self, idx: torch.Tensor, confidence: float = 0.99, *, probe: int = 8, prior=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mixture only while it is uncertain, then the top domain's route alone.

        See :func:`peer_ll.models.insurance.insured_mixture` (arguments and returns);
        the mixture is :meth:`domain_posterior`'s; ``prior``: e.g. an ``NgramDomainPrior``.
        ``idx`` (B, T) -> log-probabilities (B, T, V) and (B,) routes per token.
        """
        return insured_mixture(
            self._mixture,
            lambda d, ids: self._logits(ids, d),
            idx,
            self.owners,
            confidence=confidence,
            probe=probe,
            prior=prior,
        )

    def _mixture(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (B, T, V) of the posterior mixture, log-posterior (O, B, T)."""
        return posterior_mixture(torch.stack([self._logits(idx, d) for d in self.owners]), idx)

    # ------------------------------------------------------------------- growth
    def grow(self, num_keys: int, *, owner: int) -> dict[int, torch.Tensor]:
        """Append a segment of ``num_keys``² experts owned by ``owner`` to every PEER layer.

        Args:
            num_keys: sub-keys per side of the new segment.
            owner: a new owner id, larger than every present one (training order).

        With growth "branch" the new experts' output weights (``up`` rows) start at
        zero, so every route computes what it computed before until they train, and
        (with ``config.grow_dense_blocks``) dense blocks grow experts too, in a
        PEER layer beside their MLP (:meth:`Block.grow_dense`), and (with
        ``config.attention_adapter_rank``) every attention gets low-rank deltas
        that only ``owner``'s route applies.

        Returns:
            {block index: (num_keys²,) ids of the new experts}.
        """
        return grow_domain(self, num_keys, owner=owner)

    def freeze_old(self, owner: int) -> None:
        """Freeze everything except the experts and sub-keys of ``owner``.

        Embeddings, attention, LayerNorms, the head, every shared PEER query
        network and the experts, sub-keys and query adapters of all other owners
        get no gradient and no optimizer change (with
        :func:`peer_ll.optim.make_optimizer`). ``owner``'s query and attention
        adapters train.
        """
        freeze_all_but(self, owner)

    def unfreeze_all(self) -> None:
        """Make every parameter, expert and sub-key trainable again."""
        for p in self.parameters():
            p.requires_grad_(True)
        for layer in peer_layers(self).values():
            layer.unfreeze(None, keys=True, query=True)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        owners: LMOwners = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample a continuation: (B, T0) prompt ids -> (B, T0 + max_new_tokens).

        The context is cropped to the last ``block_size`` tokens. ``temperature``
        0 means greedy decoding; ``owners`` is passed to :meth:`forward`. Decode
        bytes with :func:`peer_ll.data.text.decode`.
        """
        return sample(
            self,
            idx,
            max_new_tokens,
            block_size=self.config.block_size,
            temperature=temperature,
            top_k=top_k,
            owners=owners,
            generator=generator,
        )

    # ---------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights with safetensors (no pickle), atomically.

        The file's header holds the config as JSON, the names of the frozen
        parameters and a SHA-256 of the content, checked by :meth:`load`. An
        interrupted save leaves any previous checkpoint at ``path`` intact and no
        temporary file behind.
        """
        save_model(self, path)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights; blocks first get the grown layers and adapters the checkpoint has.

        A failed load raises ValueError (or TypeError) and changes nothing.
        """

        def load():
            for i, block in enumerate(self.blocks):
                block.match_checkpoint(self.config, state_dict, f"blocks.{i}.")
            return super(PEERLM, self).load_state_dict(state_dict, strict=strict, assign=assign)

        return load_or_restore(self, load)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> PEERLM:
        """Build a PEERLM from :meth:`save`'s file; PEER layers grow to the saved pools.

        The header is checked before anything is allocated: format, every config key,
        and a model size that fits in memory; then the content hash, then the weights.

        Raises:
            ValueError: an empty, truncated, corrupted or foreign file, or a bad config.
        """
        return load_model(cls, path, map_location)


__all__ = ["CHECKPOINT_FORMAT", "PEERLM", "LMConfig"]
