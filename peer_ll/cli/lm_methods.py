"""Ways to learn a new text domain with a trained :class:`peer_ll.models.PEERLM`.

- ``full``: full finetuning; every parameter trains.
- ``sparse``: PEER sparse finetuning by TF-IDF (Lin et al. 2025, arXiv 2510.15103):
  only expert rows train, and each step only the ``top_t`` rows per layer whose
  access on the batch is highest relative to their access on earlier domains.
- ``grow-only``: the frozen model that only grows new experts. A segment of
  experts owned by the new domain joins every PEER layer's pool (growth
  "pool"); everything else is frozen (embeddings, attention, norms, head, query
  networks, old experts and old sub-keys). Retrieval stays the paper's single
  top-k over every expert, in training and at test.
- ``grow-and-freeze``: the same growth and freezing, but the new experts form a
  branch (growth "branch": a second retrieval, restricted to the domain's own
  experts and summed with the base one, starting as a no-op), and at test time
  each token's domain is inferred from the context (``domain="infer"``), so an
  old domain's text keeps exactly its old route.
- ``grow-pool``: grow-only whose new segment wins exactly the new domain's tokens
  (k-means sub-keys, retrieval regulariser with pseudo-queries of the earlier domains):
  one retrieval per token and no domain inference (:mod:`peer_ll.cli.lm_pool`). With
  ``pool_query="shared"`` the new sub-keys are scored with the base's query (one search
  over the pool, whose segments add to the search only); with "own" each domain trains its own query
  adapter (one search per domain). Not in the default ``--methods``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from peer_ll.cli.lm_train import GradHook, sample_batches
from peer_ll.experts.checks import check_choice, check_int
from peer_ll.models.lm import PEERLM
from peer_ll.models.lm import LMOwners as Domain
from peer_ll.models.transformer import LMConfig
from peer_ll.strategies.pool_growth import PoolGrowthConfig

METHODS = ("full", "sparse", "grow-only", "grow-and-freeze", "grow-pool")
DEFAULT_METHODS = METHODS[:4]


@dataclass
class MethodSettings:
    """Knobs of the methods (see the module docstring)."""

    grow_keys: int = 32  # sub-keys per side of a grown segment: grow_keys² new experts
    top_t: int = 256  # sparse: expert rows trained per layer and step (Lin et al.: t)
    steps: int = 250  # grow-pool: training steps (its regulariser hook counts them)
    background_batches: int = 32  # sparse: batches of each earlier domain for the IDF
    pool: PoolGrowthConfig = field(default_factory=lambda: pool_config())  # grow-pool
    pool_query: str = "shared"  # grow-pool: "shared" (the base's query) or "own" adapters

    def __post_init__(self) -> None:
        check_choice("pool_query", self.pool_query, ("shared", "own"))


def pool_config(
    pseudo: str = "centroids",
    *,
    keep: float = 1.0,
    margin: float = 1.0,
    copy_experts: bool = False,
    centroids: int = 256,
    centroid_noise: float = 1.0,
) -> PoolGrowthConfig:
    """grow-pool's :class:`PoolGrowthConfig`: k-means keys, the regulariser (keep weight
    ``keep``, ``margin``), the model's query adapters (no calibration of its own),
    pseudo-queries drawn as ``pseudo`` says (``centroids`` per earlier domain, layer and
    head, plus ``centroid_noise`` × their spread), new experts copied from old ones or
    random."""
    return PoolGrowthConfig(
        calibrate=False,
        pseudo=pseudo,
        keep_weight=keep,
        margin=margin,
        copy_experts=copy_experts,
        centroids=centroids,
        centroid_noise=centroid_noise,
    )


class TfidfRows:
    """Gradient hook of PEER sparse finetuning: keep the top-t rows by TF-IDF.

    Lin et al. 2025 rank memory slots by TF-IDF: the term frequency is a slot's
    access on the current batch, the inverse document frequency counts the
    background batches (earlier domains) that accessed it. Here the access of an
    expert is its router mass (gate-weighted hits), a row counts as accessed by a
    background batch when its mass there is positive, and the IDF is smoothed,
    ``log((1 + n) / (1 + df)) + 1``. Only the top ``top_t`` rows of each PEER
    layer keep their (row-sparse) gradients; nothing else trains.

    Args:
        model: the model; call with it after ``backward()``.
        background: list of (N, T + 1) block tensors of the earlier domains.
        top_t: rows trained per layer and step.
        batches: batches per background domain.
        batch_size: blocks per background batch.
    """

    def __init__(
        self,
        model: PEERLM,
        background: list[torch.Tensor],
        *,
        top_t: int,
        batches: int = 32,
        batch_size: int = 16,
    ) -> None:
        self.top_t = check_int("top_t", top_t, minimum=1)
        layers = model.peer_layers
        df = [torch.zeros(layer.num_experts) for layer in layers]
        n_docs = 0
        model.eval()
        with torch.no_grad():
            for blocks in background:
                for batch in sample_batches(blocks, batch_size=batch_size, steps=batches):
                    for layer in layers:
                        layer.reset_routing_stats()
                    model(batch[:, :-1])
                    for d, layer in zip(df, layers, strict=True):
                        d += (layer.expert_mass > 0).float()
                    n_docs += 1
        # Smoothed IDF (as scikit-learn's): a small pool is hit by nearly every batch,
        # where the plain log(n / df) would be 0 for every row and select nothing.
        self.idf = [torch.log((n_docs + 1) / (d + 1)) + 1 for d in df]
        for layer in layers:
            layer.reset_routing_stats()
        model.train()

    def __call__(self, model: PEERLM) -> None:
        for layer, idf in zip(model.peer_layers, self.idf, strict=True):
            score = layer.expert_mass * idf  # TF (this batch) · IDF
            keep = torch.zeros(layer.capacity, dtype=torch.bool)
            keep[score.topk(min(self.top_t, score.numel())).indices] = True
            keep[: score.numel()] &= score > 0
            for p in (layer.down, layer.up):
                if p.grad is not None:
                    p.grad = _keep_rows(p.grad, keep)
            layer.reset_routing_stats()  # the next forward is the next batch's TF


def _keep_rows(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if not grad.is_sparse:
        return grad * keep[:, None].to(grad.dtype)
    grad = grad.coalesce()
    rows = grad.indices()[0]
    sel = keep[rows]
    return torch.sparse_coo_tensor(
        rows[sel][None],
        grad.values()[sel],
        grad.shape,
        is_coalesced=True,
        check_invariants=False,
    )


def prepare(
    method: str,
    model: PEERLM,
    *,
    owner: int,
    settings: MethodSettings,
    background: list[torch.Tensor],
    new_blocks: torch.Tensor | None = None,
) -> GradHook | None:
    """Set ``model`` up to learn domain ``owner`` with ``method``; returns a gradient hook.

    Args:
        method: one of ``METHODS``.
        model: a trained model, changed in place.
        owner: the new domain's owner id (its index in the stream).
        settings: the methods' knobs.
        background: earlier domains' training blocks (for ``sparse``'s IDF).
        new_blocks: the new domain's training blocks (for ``grow-pool``'s k-means).
    """
    check_choice("method", method, METHODS)
    model.unfreeze_all()
    if method == "full":
        return None
    if method == "grow-pool":
        from peer_ll.cli.lm_pool import prepare_pool

        return prepare_pool(
            model,
            owner=owner,
            grow_keys=settings.grow_keys,
            steps=settings.steps,
            new_blocks=new_blocks,
            old_blocks=background,
            config=settings.pool,
        )
    if method in ("grow-only", "grow-and-freeze"):
        expected = "pool" if method == "grow-only" else "branch"
        if model.config.growth != expected:
            raise ValueError(
                f"model must have config.growth={expected!r} for method {method!r}, "
                f"got {model.config.growth!r}"
            )
        model.grow(settings.grow_keys, owner=owner)
        model.freeze_old(owner)
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.peer_layers:
        layer.down.requires_grad_(True)
        layer.up.requires_grad_(True)
    return TfidfRows(model, background, top_t=settings.top_t, batches=settings.background_batches)


def growth_of(method: str) -> str:
    """The ``LMConfig.growth`` a method's model needs."""
    return "pool" if method in ("grow-only", "grow-pool") else "branch"


def model_config(base: LMConfig, method: str, settings: MethodSettings) -> LMConfig:
    """The config of a method's model, from the base's (same shape and weights)."""
    shared = method == "grow-pool" and settings.pool_query == "shared"
    return dataclasses.replace(base, growth=growth_of(method), shared_query_adapter=shared)


def train_domain(method: str, owner: int) -> Domain:
    """The route a method trains domain ``owner`` through."""
    return owner if method in ("grow-only", "grow-and-freeze", "grow-pool") else None


# Reported rows: label -> (method, evaluation domain: None, "infer" or "known").
EVALUATIONS = {
    "full finetuning": ("full", None),
    "sparse finetuning (TF-IDF)": ("sparse", None),
    "grow-only (all experts)": ("grow-only", None),
    "grow-and-freeze": ("grow-and-freeze", "infer"),
    "grow-and-freeze, domain known": ("grow-and-freeze", "known"),
    "grow-and-freeze, all branches": ("grow-and-freeze", None),
    "grow-pool (one retrieval)": ("grow-pool", None),
}


def eval_domain(mode: Domain, domain: int, model: PEERLM) -> Domain:
    """The ``domain`` argument an evaluation mode gives test set ``domain``.

    "known" uses the domain's own route once the model has it, else every expert.
    """
    if mode != "known":
        return mode
    return domain if domain in model.owners else None
