"""The strategies that ``peer-ll run`` compares, built by name on a ``PEERClassifier``.

Every strategy gets the same model family, optimizer (``peer_ll.optim.make_optimizer``,
constant learning rate), epochs, mini-batch size and replay budget:

| key | strategy | model | replay |
|---|---|---|---|
| ``naive`` | fine-tuning | fixed pool | none |
| ``ewc`` | EWC (Kirkpatrick et al. 2017) | fixed pool | none |
| ``lwf`` | LwF (Li & Hoiem 2017) | fixed pool | none |
| ``replay`` | experience replay | fixed pool | ``replay_budget`` |
| ``peer-grow`` | growth, old experts frozen | growing pool | ``replay_budget`` |
| ``peer-grow-rd`` | growth + RouterDistillation | growing pool | ``replay_budget`` |
| ``peer-sparse`` | SparseExpertFinetuning (top-t rows by TF-IDF) | fixed pool | ``replay_budget`` |
| ``peer-protect-full`` | protection: input PPCA owners, per-owner encoder | growing | none |
| ``slda`` | Avalanche's StreamingLDA on the raw inputs | no network | none |
| ``input-stats`` | the per-(experience, class) Gaussians of owner inference, alone | none | none |
| ``peer-protect-mlp`` | ``peer-protect-full`` with a per-owner MLP for the pool | no pool | none |
| ``joint`` | joint training on all experiences (upper bound) | fixed pool | all data |
| ``peer-grow-noreplay`` | growth alone (not in the default set) | growing pool | none |
| ``peer-protect`` | routing protection, likelihood owners (not default) | growing | none |
| ``peer-protect-gate`` | routing protection, replay owner gate (not default) | growing | budget |
| ``peer-protect-input`` | routing protection, input PPCA owners (not default) | growing | none |
| ``peer-grow-online`` | task-free growth (``NoveltyTrigger``), old frozen | growing | budget |
| ``peer-grow-loss`` | task-free growth (``LossJumpTrigger``), old frozen | growing | budget |
| ``peer-grow-pool`` | one-pool growth (``peer_grow_pool``), domain streams | growing | none |

On ``online`` streams the other PEER strategies see the task boundaries (Avalanche then
adapts the model to each base experience, so ``peer-grow`` grows once per base
experience); ``peer-grow-online`` sees none and grows when its novelty signal says so
(room for ``2·T`` segments); ``peer-grow-loss`` likewise, when the loss on an experience's
first labelled inputs jumps above the recent loss.

On task-incremental streams the ``peer-protect*`` strategies route by task label and
``slda`` / ``input-stats`` score only the task's classes, as the multi-head baselines do.
``peer-protect-mlp`` has the same owner inference, encoder and heads as
``peer-protect-full``, with each PEER layer replaced by a per-owner MLP of the PEER
layer's active parameters (``peer_ll.protect.mlp_ablation``): the gap between the two is
what retrieval over a growing pool adds.

A growing pool starts with ``num_keys²`` experts and adds as many per experience; a
fixed pool holds about as many experts as the growing one ends with
(``round(num_keys · √T)²``), so total parameters match across strategies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from peer_ll.evaluation.counts import parameter_counts
from peer_ll.experts.checks import check_choice
from peer_ll.models import PEERClassifier
from peer_ll.optim import make_optimizer

__all__ = [
    "DEFAULT_STRATEGIES",
    "NON_PEER_BASELINES",
    "NO_PEER",
    "STRATEGIES",
    "StreamInfo",
    "TASK_FREE",
    "ZooConfig",
    "build_strategy",
    "parameter_counts",
    "stream_info",
]

#: Strategy key -> display name, in table order.
STRATEGIES: dict[str, str] = {
    "naive": "Naive",
    "ewc": "EWC",
    "lwf": "LwF",
    "replay": "Replay",
    "peer-grow": "PEER growth",
    "peer-grow-rd": "PEER growth + RD",
    "peer-sparse": "PEER sparse FT",
    "peer-protect-full": "PEER protect (full)",
    "slda": "StreamingLDA",
    "input-stats": "Input-statistics classifier",
    "peer-protect-mlp": "Protect (full), per-owner MLP",
    "joint": "Joint",
    "peer-grow-noreplay": "PEER growth, no replay",
    "peer-protect": "PEER protect",
    "peer-protect-gate": "PEER protect + gate",
    "peer-protect-input": "PEER protect, input owners",
    "peer-grow-online": "PEER task-free growth",
    "peer-grow-loss": "PEER task-free growth, loss jump",
    "peer-grow-pool": "PEER growth into one pool",
}
#: PEER strategies that see no task boundary on online streams (they decide growth).
TASK_FREE: frozenset[str] = frozenset({"peer-grow-online", "peer-grow-loss"})
#: Strategies that freeze the head: domain streams only (one fixed head).
DOMAIN_ONLY: frozenset[str] = frozenset({"peer-grow-pool"})
DEFAULT_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)[:12]
#: Strategies whose model has no PEER layer (no routing metrics).
NO_PEER: frozenset[str] = frozenset({"slda", "input-stats", "peer-protect-mlp"})
#: The replay-free baselines without a PEER pool that the PEER methods must beat.
NON_PEER_BASELINES: tuple[str, ...] = ("slda", "input-stats", "peer-protect-mlp")
#: Strategies that learn statistics, not gradients: not data-parallel (skipped under --nproc).
STATISTICS_ONLY: frozenset[str] = frozenset({"slda", "input-stats"})

#: The head that suits each stream kind (see ``PEERClassifier``).
HEAD_OF_KIND = {
    "class": "incremental", "task": "multihead", "permuted": "fixed", "rotated": "fixed",
    "online": "fixed",  # online mini-experiences carry no classes_in_this_experience
}  # fmt: skip


@dataclass
class ZooConfig:
    """Training settings shared by every strategy."""

    epochs: int = 5  # passes over each experience
    lr: float = 1e-3  # Adam learning rate, constant
    batch_size: int = 32  # training mini-batch
    eval_batch_size: int = 256
    replay_budget: int = 200  # samples in memory (Replay and the PEER strategies)
    hidden: int = 64  # width of the encoder and the PEER block
    num_keys: int = 16  # sub-keys per side of a segment: 256 experts per growth
    ewc_lambda: float = 100.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    rd_alpha: float = 1.0  # RouterDistillation weight
    top_t: int = 64  # rows per layer and step for sparse finetuning
    device: str = "cpu"
    shard_experts: bool = False  # under --nproc: split the expert tables by columns


@dataclass(frozen=True)
class StreamInfo:
    """What a model needs to know about a stream."""

    kind: str  # "class", "task", "permuted", "rotated" or "online"
    in_features: int
    n_classes: int  # classes over the whole stream
    classes_per_exp: int  # most classes in one experience
    n_experiences: int


def stream_info(bench, kind: str) -> StreamInfo:
    """:class:`StreamInfo` of an Avalanche benchmark built with ``make_stream(kind=...)``.

    For ``kind="online"``, ``bench`` is the class-incremental stream that each run cuts
    into mini-experiences (:mod:`peer_ll.cli.online`).
    """
    check_choice("kind", kind, HEAD_OF_KIND)
    train = bench.train_stream  # online: the class stream it is cut from
    per_exp = [len(exp.classes_in_this_experience) for exp in train]
    x = train[0].dataset[0][0]
    n_classes = max(per_exp) if kind == "task" else int(bench.n_classes)
    return StreamInfo(kind, int(x.numel()), n_classes, max(per_exp), len(per_exp))


def _model(info: StreamInfo, config: ZooConfig, *, grow: bool | str) -> PEERClassifier:
    from peer_ll.strategies import GrowthPolicy, NoveltyTrigger, attach_growth, peer_classifier
    from peer_ll.strategies.novelty import LossJumpTrigger

    n, t = config.num_keys, info.n_experiences
    if grow == "novelty":
        keys, policy = n, GrowthPolicy(when=NoveltyTrigger(), max_experts=2 * t * n * n)
    elif grow == "loss":  # the trigger scores inputs with the model it grows: policy after
        keys, policy = n, None
    elif grow:
        keys, policy = n, GrowthPolicy(max_experts=t * n * n)
        if grow == "pool":  # one fixed head: DOMAIN_ONLY
            model = peer_classifier(
                info.in_features, info.n_classes, hidden=config.hidden, peer={"num_keys": keys},
                head="fixed", growth="pool",
            )  # fmt: skip
            attach_growth(model, policy)
            return model
    else:
        keys, policy = round(n * math.sqrt(t)), GrowthPolicy(when="never")
    head = HEAD_OF_KIND[info.kind]
    classes = info.n_classes if head == "fixed" else info.classes_per_exp
    model = peer_classifier(
        info.in_features, classes, hidden=config.hidden, peer={"num_keys": keys}, head=head,
        growth=policy,
    )  # fmt: skip
    if grow == "loss":
        attach_growth(model, GrowthPolicy(when=LossJumpTrigger(model), max_experts=2 * t * n * n))
    return model


def build_strategy(key: str, info: StreamInfo, config: ZooConfig, *, evaluator=None):
    """Builds strategy ``key`` (see the module table) with a fresh model.

    Args:
        key: one of :data:`STRATEGIES`.
        info: the stream's :class:`StreamInfo`.
        config: shared training settings.
        evaluator: the Avalanche ``EvaluationPlugin`` (None: no metrics).

    Returns:
        The Avalanche strategy; its model is ``strategy.model``.
    """
    import avalanche.training as av

    from peer_ll.strategies import peer_grow, peer_sparse_finetuning

    check_choice("key", key, STRATEGIES)
    task = info.kind == "task"
    if key in ("slda", "input-stats"):
        return _no_network(key, info, config, evaluator)
    if key.startswith("peer-protect"):
        from peer_ll.protect import protect_classifier
        from peer_ll.protect.mlp_ablation import owner_mlp_classifier

        build = owner_mlp_classifier if key == "peer-protect-mlp" else protect_classifier
        model = build(
            info.in_features, info.n_classes, experiences=info.n_experiences,
            hidden=config.hidden, num_keys=config.num_keys,
            owner_encoder=key in ("peer-protect-full", "peer-protect-mlp"),
        )  # fmt: skip
    else:
        grow = {
            "peer-grow-online": "novelty",
            "peer-grow-loss": "loss",
            "peer-grow-pool": "pool",
        }.get(key, key.startswith("peer-grow"))
        model = _model(info, config, grow=grow)
    common = dict(
        optimizer=make_optimizer(model, lr=config.lr), criterion=nn.CrossEntropyLoss(),
        train_mb_size=config.batch_size, train_epochs=config.epochs,
        eval_mb_size=config.eval_batch_size, device=torch.device(config.device),
        evaluator=evaluator, eval_every=-1,
    )  # fmt: skip
    replay = dict(template=av.Replay, mem_size=config.replay_budget)
    if key in ("naive", "peer-grow-noreplay"):
        return peer_grow(model, **common)
    if key == "ewc":
        return peer_grow(model, template=av.EWC, ewc_lambda=config.ewc_lambda, **common)
    if key == "lwf":
        lwf = dict(alpha=config.lwf_alpha, temperature=config.lwf_temperature)
        return peer_grow(model, template=av.LwF, **lwf, **common)
    if key in ("replay", "peer-grow", *TASK_FREE):
        return peer_grow(model, **replay, **common)
    if key == "peer-grow-pool":
        from peer_ll.strategies.pool_growth import OWN_QUERY, PoolGrowth
        from peer_ll.strategies.pool_growth_plugin import peer_grow_pool

        # as many pseudo-queries per old owner and step as inputs in a mini-batch
        cfg = dataclasses.replace(OWN_QUERY, pseudo_queries=config.batch_size)
        growth = PoolGrowth(cfg)
        return peer_grow_pool(model, growth=growth, **common)
    if key == "peer-grow-rd":
        from peer_ll.protect import peer_router_distillation

        return peer_router_distillation(model, alpha=config.rd_alpha, **replay, **common)
    if key.startswith("peer-protect"):
        from peer_ll.protect import peer_protect

        inference = {
            "peer-protect": {},
            "peer-protect-gate": dict(inference="gate", mem_size=config.replay_budget),
            "peer-protect-input": dict(inference="input"),
            "peer-protect-full": dict(inference="input"),
            "peer-protect-mlp": dict(inference="input"),
        }[key]
        return peer_protect(model, **inference, task_labels=task, **common)
    if key == "peer-sparse":
        return peer_sparse_finetuning(model, top_t=config.top_t, **replay, **common)
    return peer_grow(model, template=av.JointTraining, **common)


def _no_network(key: str, info: StreamInfo, config: ZooConfig, evaluator):
    """The baselines without a network: StreamingLDA and the input-statistics classifier."""
    from peer_ll.protect.stats_classifier import input_stats_classifier
    from peer_ll.strategies.baselines import streaming_lda

    task = info.kind == "task"
    common = dict(train_mb_size=config.batch_size, eval_mb_size=config.eval_batch_size,
                  device=torch.device(config.device), evaluator=evaluator,
                  eval_every=-1)  # fmt: skip
    if key == "slda":
        return streaming_lda(info.in_features, info.n_classes,
                             n_tasks=info.n_experiences if task else None, **common)  # fmt: skip
    return input_stats_classifier(info.in_features, info.n_classes, task_labels=task, **common)
