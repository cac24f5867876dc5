"""A :class:`~peer_ll.models.PEERLM` in Avalanche strategies, on text domain streams.

:func:`peer_ll.data.text.text_domain_stream` is an Avalanche benchmark whose
experiences are text domains; its samples are ``(x (T,), y (T,), task)`` with y the
next tokens. :class:`AvalancheLM` makes a ``PEERLM`` an ordinary Avalanche model
(logits ``(B, V, T)``, so ``nn.CrossEntropyLoss`` and Avalanche's loss metrics work
unchanged: perplexity is ``exp`` of the reported loss), and :class:`LMDomainGrowth`
is the grow-and-freeze method as a plugin: each new domain (task label) grows its
own experts and adapters and trains alone, everything older frozen; evaluation
infers the domain (or uses the task label with ``eval_domain="task"``).

    strategy = peer_lm_strategy(PEERLM(LMConfig()), train_mb_size=16, train_epochs=1)
    for exp in stream.train_stream:
        strategy.train(exp)
        strategy.eval(stream.test_stream)
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from peer_ll.experts.checks import check_int
from peer_ll.models.lm import PEERLM
from peer_ll.optim import make_optimizer

EVAL_DOMAINS = ("infer", "task", "all")


class AvalancheLM(nn.Module):
    """A PEERLM whose forward returns logits only, classes on dim 1: (B, T) -> (B, V, T).

    Attributes:
        lm: the wrapped model.
        domain: the route every forward uses (see :meth:`PEERLM.forward`); set per
            experience by :class:`LMDomainGrowth`.
    """

    def __init__(self, lm: PEERLM) -> None:
        super().__init__()
        if not isinstance(lm, PEERLM):
            raise TypeError(f"lm: expected a PEERLM, got {type(lm).__name__}")
        self.lm = lm
        self.domain: int | str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(x, owners=self.domain)[0].transpose(1, 2)


class LMDomainGrowth(SupervisedPlugin):
    """Grow-and-freeze per text domain (the task label of the experience).

    Args:
        grow_keys: sub-keys per side of each new domain's expert segments.
        eval_domain: "infer" (posterior mixture over domains, no label), "task" (the
            evaluated experience's task label: task-aware inference) or "all"
            (every expert, no restriction).

    The first domain trains the whole model (owner 0). Each later domain ``d``
    calls ``lm.grow(grow_keys, owner=d)`` and ``lm.freeze_old(d)`` before the
    optimizer is rebuilt, and trains through its own route.
    """

    def __init__(self, grow_keys: int = 32, *, eval_domain: str = "infer") -> None:
        super().__init__()
        self.grow_keys = check_int("grow_keys", grow_keys, minimum=1)
        if eval_domain not in EVAL_DOMAINS:
            raise ValueError(f"eval_domain: expected one of {EVAL_DOMAINS}, got {eval_domain!r}")
        self.eval_domain = eval_domain
        self._training_domain: int | None = None

    @staticmethod
    def _wrapper(strategy) -> AvalancheLM:
        if not isinstance(strategy.model, AvalancheLM):
            raise TypeError(
                f"strategy.model: expected an AvalancheLM, got {type(strategy.model).__name__}"
            )
        return strategy.model

    @staticmethod
    def _domain(experience) -> int:
        labels = getattr(experience, "task_labels", None) or [experience.current_experience]
        if len(labels) != 1:
            raise ValueError(f"experience: expected one task label (a domain), got {labels}")
        return int(labels[0])

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Before the optimizer is rebuilt, so the new parameters are optimised.
        wrapper = self._wrapper(strategy)
        lm, domain = wrapper.lm, self._domain(strategy.experience)
        if domain not in lm.owners:
            lm.grow(self.grow_keys, owner=domain)
        if domain != lm.owners[0]:
            lm.freeze_old(domain)
        wrapper.domain = self._training_domain = domain

    def before_eval_exp(self, strategy, **kwargs) -> None:
        wrapper = self._wrapper(strategy)
        if self.eval_domain == "task":
            domain = self._domain(strategy.experience)
            wrapper.domain = domain if domain in wrapper.lm.owners else None
        else:
            wrapper.domain = None if self.eval_domain == "all" else "infer"

    def after_eval(self, strategy, **kwargs) -> None:
        self._wrapper(strategy).domain = self._training_domain


def peer_lm_strategy(
    lm: PEERLM,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    grow_keys: int = 32,
    eval_domain: str = "infer",
    lr: float = 3e-3,
    template: type = SupervisedTemplate,
    plugins=(),
    **template_kwargs,
):
    """An Avalanche strategy that trains ``lm`` by grow-and-freeze over text domains.

    Args:
        lm: the language model (wrapped in an :class:`AvalancheLM`, ``strategy.model``).
        optimizer: default ``peer_ll.optim.make_optimizer(model, lr=lr)``.
        grow_keys, eval_domain: as for :class:`LMDomainGrowth`.
        lr: learning rate of the default optimizer.
        template: the Avalanche template (default ``SupervisedTemplate``).
        plugins: extra plugins.
        **template_kwargs: ``train_mb_size``, ``train_epochs``, ``evaluator``, ...
    """
    model = AvalancheLM(lm)
    optimizer = make_optimizer(model, lr=lr) if optimizer is None else optimizer
    growth = LMDomainGrowth(grow_keys, eval_domain=eval_domain)
    return template(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        plugins=[*plugins, growth],
        **template_kwargs,
    )


__all__ = ["AvalancheLM", "LMDomainGrowth", "peer_lm_strategy"]
