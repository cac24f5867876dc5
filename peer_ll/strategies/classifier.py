"""PEER classifiers for Avalanche streams: Avalanche heads, and growth attached.

:func:`peer_classifier` is the one call that makes a
:class:`~peer_ll.models.PEERClassifier` ready for any Avalanche strategy: it builds
the head the stream needs and makes every PEER layer grow per experience
(:func:`~peer_ll.strategies.attach_growth`). The head is one of:

- "incremental": Avalanche's ``IncrementalClassifier``, which adds output units as
  new classes arrive (class-incremental streams);
- "multihead": Avalanche's ``MultiHeadClassifier``, one head per task label
  (task-incremental streams); the model is then a :class:`MultiHeadPEERClassifier`,
  an Avalanche ``MultiTaskModule``, so strategies pass the task labels to
  ``forward(x, task_labels)``;
- "fixed": a ``Linear`` layer with ``num_classes`` outputs (domain-incremental).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from torch import nn

from peer_ll.experts import Owners
from peer_ll.experts.checks import check_choice, check_int
from peer_ll.models import PEERClassifier
from peer_ll.strategies.growth import GrowthPolicy, attach_growth

HEADS = ("incremental", "multihead", "fixed")


class MultiHeadPEERClassifier(PEERClassifier, MultiTaskModule):
    """A :class:`PEERClassifier` with one Avalanche head per task label."""

    def forward(self, x: torch.Tensor, task_labels=None, owners: Owners = None):
        """(B, *), task labels (B,) or int -> logits; None -> {task: logits}."""
        return self.head(self.features(x, owners), task_labels)


def peer_classifier(
    in_features: int,
    num_classes: int,
    *,
    head: str = "incremental",
    growth: GrowthPolicy | str | None = None,
    **kwargs: Any,
) -> PEERClassifier:
    """A :class:`PEERClassifier` with an Avalanche head whose PEER layers grow.

    Args:
        in_features: size of a flattened input sample.
        num_classes: initial number of output units (the "incremental" and
            "multihead" heads add units for new classes).
        head: "incremental", "multihead" or "fixed".
        growth: the :class:`GrowthPolicy` of every PEER layer (default:
            ``GrowthPolicy()``, one segment per new experience, earlier owners
            frozen); ``GrowthPolicy(when="never")`` keeps the pool fixed. A string
            is the model's ``growth`` (:class:`PEERClassifier`: "owner" or "pool")
            with the default policy; ``growth="pool"`` is the one-pool growth of
            :func:`peer_ll.strategies.pool_growth_plugin.peer_grow_pool`.
        **kwargs: ``hidden``, ``blocks``, ``peer`` of :class:`PEERClassifier`.

    Returns:
        The model (a :class:`MultiHeadPEERClassifier` for "multihead").
    """
    check_choice("head", head, HEADS)
    check_int("num_classes", num_classes, minimum=1)
    hidden = kwargs.get("hidden", 128)
    check_int("hidden", hidden, minimum=1)
    if isinstance(growth, str):
        kwargs["growth"], growth = growth, None
    if head == "fixed":
        model = PEERClassifier(in_features, num_classes, **kwargs)
    else:  # the head is built last, as the model's own Linear head would be (same init order)
        cls = PEERClassifier if head == "incremental" else MultiHeadPEERClassifier
        model = cls(in_features, num_classes, head=nn.Identity(), **kwargs)
        avalanche_head = IncrementalClassifier if head == "incremental" else MultiHeadClassifier
        model.head = avalanche_head(hidden, initial_out_features=num_classes)
    attach_growth(model, growth)
    return model
