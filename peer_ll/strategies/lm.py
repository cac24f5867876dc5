"""A :class:`~peer_ll.models.PEERLM` in Avalanche strategies, on text domain streams.

:func:`peer_ll.data.text.text_domain_stream` is an Avalanche benchmark whose
experiences are text domains; its samples are ``(x (T,), y (T,), task)`` with y the
next tokens. :class:`AvalancheLM` makes a ``PEERLM`` an ordinary Avalanche model
(logits ``(B, V, T)``, so ``nn.CrossEntropyLoss`` and Avalanche's loss metrics work
unchanged: perplexity is ``exp`` of the reported loss). It takes each sequence's
task label as its domain (owner). :class:`LMDomainGrowth` is the grow-and-freeze
method as a plugin: each new domain grows its own experts and adapters and trains
alone, everything older frozen; evaluation infers the domain (or uses the task
label with ``eval_domain="task"``).

    strategy = peer_lm_strategy(PEERLM(LMConfig()), train_mb_size=16, train_epochs=1)
    for exp in stream.train_stream:
        strategy.train(exp)
        strategy.eval(stream.test_stream)
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import DynamicModule, MultiTaskModule
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from peer_ll.experts.checks import check_choice, check_int, check_type
from peer_ll.models.lm import PEERLM
from peer_ll.optim import make_optimizer

EVAL_DOMAINS = ("infer", "task", "all")


class AvalancheLM(MultiTaskModule):
    """A PEERLM whose forward returns logits only, classes on dim 1: (B, T) -> (B, V, T).

    An Avalanche ``MultiTaskModule``: strategies pass each sequence's task label,
    which is its domain (owner). Training runs every sequence through its own
    domain's route; evaluation uses ``eval_domain``.

    Args:
        lm: the wrapped model.
        eval_domain: "infer" (posterior mixture over domains, no label), "task" (the
            task labels, when every one is a known domain: task-aware inference) or
            "all" (every expert, no restriction).
    """

    def __init__(self, lm: PEERLM, *, eval_domain: str = "infer") -> None:
        super().__init__()
        self.lm = check_type("lm", lm, PEERLM)
        self.eval_domain = check_choice("eval_domain", eval_domain, EVAL_DOMAINS)

    def owners_for(self, task_labels) -> int | str | torch.Tensor | None:
        """The ``owners`` argument of ``lm`` for a batch with these task labels."""
        if isinstance(task_labels, torch.Tensor) and task_labels.dim() == 0:
            task_labels = int(task_labels)
        if self.training or self.eval_domain == "task":
            labels = (
                {task_labels}
                if isinstance(task_labels, int)
                else (set() if task_labels is None else set(task_labels.tolist()))
            )
            known = bool(labels) and labels <= set(self.lm.owners)
            if self.training and not known:
                raise ValueError(
                    f"task_labels must be among the model's domains "
                    f"{self.lm.owners} in training, got {sorted(labels)}"
                )
            return task_labels if known else None
        return None if self.eval_domain == "all" else "infer"

    def adaptation(self, experience) -> None:
        """Record the task labels; text experiences have no classes to adapt to."""
        DynamicModule.adaptation(self, experience)
        if self.training:
            self.known_train_tasks_labels |= {int(t) for t in experience.task_labels}

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        return self.lm(x, owners=self.owners_for(task_labels))[0].transpose(1, 2)


class LMDomainGrowth(SupervisedPlugin):
    """Grow-and-freeze per text domain (the task label of the experience).

    Args:
        grow_keys: sub-keys per side of each new domain's expert segments.

    The first domain trains the whole model (owner 0). Each later domain ``d``
    calls ``lm.grow(grow_keys, owner=d)`` and ``lm.freeze_old(d)`` before the
    optimizer is rebuilt; its sequences then train through its own route
    (:class:`AvalancheLM` passes their task labels as owners).
    """

    def __init__(self, grow_keys: int = 32) -> None:
        super().__init__()
        self.grow_keys = check_int("grow_keys", grow_keys, minimum=1)

    @staticmethod
    def _domain(experience) -> int:
        labels = getattr(experience, "task_labels", None) or [experience.current_experience]
        if len(labels) != 1:
            raise ValueError(f"experience must have one task label (a domain), got {labels}")
        return int(labels[0])

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Before the optimizer is rebuilt, so the new parameters are optimised.
        wrapper = check_type("strategy.model", strategy.model, AvalancheLM)
        lm, domain = wrapper.lm, self._domain(strategy.experience)
        if domain not in lm.owners:
            lm.grow(self.grow_keys, owner=domain)
        if domain != lm.owners[0]:
            lm.freeze_old(domain)


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
        grow_keys: as for :class:`LMDomainGrowth`.
        eval_domain: as for :class:`AvalancheLM`.
        lr: learning rate of the default optimizer.
        template: the Avalanche template (default ``SupervisedTemplate``).
        plugins: extra plugins.
        **template_kwargs: ``train_mb_size``, ``train_epochs``, ``evaluator``, ...
    """
    model = AvalancheLM(lm, eval_domain=eval_domain)
    optimizer = make_optimizer(model, lr=lr) if optimizer is None else optimizer
    growth = LMDomainGrowth(grow_keys)
    return template(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        plugins=[*plugins, growth],
        **template_kwargs,
    )


__all__ = ["AvalancheLM", "LMDomainGrowth", "peer_lm_strategy"]
