"""``grow-pool``: a PEERLM learns a new domain by growth into one pool, no domain inference.

Like ``grow-only`` (growth "pool": one top-k retrieval per token over every expert,
everything old frozen), with :class:`peer_ll.strategies.pool_growth.PoolGrowth` making
the new segment win the new domain's tokens and only those:

- the new sub-keys start at k-means centroids of the new domain's query halves;
- the new sub-keys are scored with the base's query (``LMConfig.shared_query_adapter``:
  one search over the pool) or, if the model gives each owner its own query adapter
  (``adapter_rank``/``adapter_affine``), with the new owner's, which scores only its own
  sub-keys, so old scores stay fixed;
- each step adds the retrieval regulariser: new top-k over old top-1 on the batch's
  queries, new top-1 under old k-th on pseudo-queries of the earlier domains. Their query
  statistics (a Gaussian, or k-means centroids with ``pseudo="centroids"``) are what a
  model stores when a domain ends; with everything old frozen they are recomputed here
  from the earlier domains' blocks, identically.

Every PEER block grows (``LMConfig.peer_layers``). Test time is the paper's layer: one
retrieval per token; with a shared query, one query and one search over the pool (each
grown segment adds its sub-keys to that search); with own adapters, one query transform
and search per owner.
"""

from __future__ import annotations

import torch

from peer_ll.cli.lm_train import sample_batches
from peer_ll.models.lm import PEERLM
from peer_ll.strategies.capture import PEERInputs, recompute_query
from peer_ll.strategies.pool_growth import PoolGrowth, PoolGrowthConfig


def layer_queries(
    model: PEERLM, blocks: torch.Tensor, *, batches: int = 8, batch_size: int = 16
) -> dict:
    """{PEER layer: (N, H, d) queries} of the model's tokens on ``blocks``."""
    watch = PEERInputs(model)
    out: dict = {}
    model.eval()
    try:
        with torch.no_grad():
            for batch in sample_batches(blocks, batch_size=batch_size, steps=batches):
                with watch.recording():
                    model(batch[:, :-1])
                for layer, (x, _) in watch.inputs.items():
                    out.setdefault(layer, []).append(recompute_query(layer, x))
    finally:
        watch.remove()
        model.train()
    return {layer: torch.cat(qs) for layer, qs in out.items()}


class PoolRegulariser:
    """A ``train_lm`` gradient hook: adds the gradient of the retrieval regulariser.

    It watches the PEER layers' inputs for ``steps`` training steps, then removes its
    forward hooks.
    """

    def __init__(self, model: PEERLM, growth: PoolGrowth, *, owner: int, steps: int) -> None:
        self.growth, self.owner, self.steps, self.calls = growth, owner, steps, 0
        self.watch = PEERInputs(model)
        self.watch.active = True
        self.gen = torch.Generator().manual_seed(owner)

    def __call__(self, model: PEERLM) -> None:
        total = None
        for layer, (x, _) in self.watch.inputs.items():
            loss = self.growth.loss(
                layer, recompute_query(layer, x.detach()), owner=self.owner, generator=self.gen
            )
            total = loss if total is None else total + loss
        if total is not None and total.requires_grad:
            total.backward()
        self.watch.inputs = {}
        self.calls += 1
        if self.calls >= self.steps:
            self.watch.remove()


def prepare_pool(
    model: PEERLM,
    *,
    owner: int,
    grow_keys: int,
    steps: int,
    new_blocks: torch.Tensor,
    old_blocks: list[torch.Tensor],
    config: PoolGrowthConfig | None = None,
) -> PoolRegulariser:
    """Grow ``model`` into one pool for domain ``owner``; returns the regulariser hook."""
    if model.config.growth != "pool":
        raise ValueError(
            f"model must have config.growth='pool' for method 'grow-pool', "
            f"got {model.config.growth!r}"
        )
    growth = PoolGrowth(config or PoolGrowthConfig(calibrate=False))  # the model's adapters
    for j, blocks in enumerate(old_blocks):
        for layer, q in layer_queries(model, blocks).items():
            growth.record(layer, j, q)
    new_q = layer_queries(model, new_blocks)
    for block in model.blocks:
        if block.is_peer:
            growth.grow(block.ffn, grow_keys, owner=owner, queries=new_q[block.ffn])
    model.freeze_old(owner)
    return PoolRegulariser(model, growth, owner=owner, steps=steps)
