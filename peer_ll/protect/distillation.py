"""Distillation of routing: LwF (Li & Hoiem 2017) applied to PEER's router.

At the start of each experience after the first, a frozen copy of the model (the
teacher) is taken, after the pool has grown. On every step the student is pulled
towards the teacher's routing on the current inputs, which with Avalanche's Replay
already mix in replayed samples, and on a batch from ``buffer`` if one is given.

:class:`RouterDistillation` matches routing distributions. For each token and head
the candidates are the union of the teacher's and the student's top-k experts; both
models score every candidate, and the loss is ``τ² · KL(p_teacher ‖ p_student)`` of the
softmaxes over the candidates at temperature τ (τ = 1 is the softmax gate itself).
The union makes the student pay for new experts that push old ones out of its top-k.

:class:`QueryDistillation` matches the queries themselves (squared error) and needs
no search; ``RouterDistillation(query_alpha=...)`` adds that term to the KL with one
teacher. Measured: the share of the first experience's top-k experts still in the
top-k of its test inputs after 5 class-incremental digits experiences (PEERClassifier
hidden 64, 64 experts per segment, 3 epochs, lr 3e-3, means of 3 seeds):

    naive 0.04 | freeze_query 0.00 | LwF 0.09 | QueryDistillation 0.41
    RouterDistillation 0.48 (alpha 5: 0.51) | query_alpha=1: 0.57 (2 of 3 seeds up)
    Replay(100) 0.27 | Replay + RouterDistillation 0.57 (accuracy 0.875 -> 0.887)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import nn
from torch.utils.data import default_collate

from peer_ll.experts import PEER
from peer_ll.experts.checks import check_float, check_int
from peer_ll.strategies.capture import PEERInputs, recompute_ids, recompute_query
from peer_ll.strategies.factories import peer_grow


def routing_kl(
    student: PEER,
    q_student: torch.Tensor,
    teacher: PEER,
    q_teacher: torch.Tensor,
    ids_teacher: torch.Tensor,
    ids_student: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean KL(teacher ‖ student) of the routing over the union of both top-k sets.

    Args:
        student, teacher: two PEER layers with the same pool layout.
        q_student: (T, H, d) student queries (differentiable).
        q_teacher: (T, H, d) teacher queries.
        ids_teacher, ids_student: (T, H, K) top-k ids of each model (no repeats
            within a row, as ``retrieve`` gives them; -1 marks a missing place).
        temperature: softmax temperature τ.

    Returns:
        A scalar: ``τ² · mean over (T, H) of KL`` of the softmaxes over the candidates.
    """
    # A student candidate that the teacher also picked counts once; -1 counts never.
    repeat = (ids_student[..., :, None] == ids_teacher[..., None, :]).any(-1)
    ignore = torch.cat([ids_teacher < 0, (ids_student < 0) | repeat], dim=-1)  # (T, H, 2K)

    def scores(layer: PEER, q: torch.Tensor) -> torch.Tensor:
        # One call per half: each half holds no repeated id.
        both = [_scores(layer, q, ids.clamp_min(0)) for ids in (ids_teacher, ids_student)]
        return torch.cat(both, dim=-1).masked_fill(ignore, float("-inf")) / temperature

    with torch.no_grad():
        log_p_t = scores(teacher, q_teacher).log_softmax(-1)
    log_p_s = scores(student, q_student).log_softmax(-1)
    diff = (log_p_t - log_p_s).masked_fill(ignore, 0.0)  # no inf - inf at ignored places
    kl = (log_p_t.exp() * diff).sum(-1)  # (T, H)
    return temperature**2 * kl.mean()


def _scores(layer: PEER, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The scores retrieval ranks ``ids`` (T, H, K) by: each with its owner's query adapter."""
    return layer._scores(q, ids)  # PEER's differentiable, adapter-aware scores


class _RoutingTeacher(SupervisedPlugin):
    """Keeps a frozen copy of the model from the start of each experience after the first."""

    def __init__(self, *, alpha: float, buffer=None, replay_mb_size: int = 32) -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, minimum=0.0)
        self.replay_mb_size = check_int("replay_mb_size", replay_mb_size, minimum=1)
        self.buffer = buffer
        self.teacher: torch.nn.Module | None = None
        self._student: PEERInputs | None = None
        self._teacher: PEERInputs | None = None
        self.last_loss: float = float("nan")

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        # Before the model adapts (grows) to the experience: a refusal changes nothing.
        _check_task_labels(strategy, type(self).__name__)

    def before_training_exp(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_counter == 0:
            return
        teacher = copy.deepcopy(strategy.model)
        teacher.requires_grad_(False)
        for layer in PEERInputs(teacher).layers:
            layer.track_routing = False
            if isinstance(layer.query_norm, torch.nn.BatchNorm1d):
                layer.query_norm.momentum = 0.0  # a frozen copy: no running statistics
        self.teacher = teacher
        self._student = PEERInputs(strategy.model)
        self._teacher = PEERInputs(teacher)

    def before_forward(self, strategy, **kwargs) -> None:
        if self._student is not None:
            self._student.inputs, self._student.active = {}, True

    def after_forward(self, strategy, **kwargs) -> None:
        if self._student is not None:
            self._student.active = False

    def before_backward(self, strategy, **kwargs) -> None:
        if self.teacher is None or not self.alpha:
            return
        loss = self._loss(strategy.mb_x, strategy.mb_task_id, self._student.inputs)
        batch = self._replay_batch()
        if batch is not None:
            x, task = batch
            x = x.to(strategy.device)
            task = task.to(strategy.device) if task is not None else None
            with self._student.recording():
                avalanche_forward(strategy.model, x, task)
            loss = loss + self._loss(x, task, self._student.inputs)
        self.last_loss = float(loss.detach())
        strategy.loss += self.alpha * loss

    def after_training_exp(self, strategy, **kwargs) -> None:
        for inputs in (self._student, self._teacher):
            if inputs is not None:
                inputs.remove()
        self.teacher, self._student, self._teacher = None, None, None

    def _loss(self, x, task, student_inputs) -> torch.Tensor:
        with torch.no_grad(), self._teacher.recording():
            avalanche_forward(self.teacher, x, task)
        total = x.new_zeros(())
        for s_layer, t_layer in zip(self._student.layers, self._teacher.layers, strict=True):
            if s_layer in student_inputs and t_layer in self._teacher.inputs:
                total = total + self._layer_loss(
                    s_layer, *student_inputs[s_layer], t_layer, *self._teacher.inputs[t_layer]
                )
        return total

    def _replay_batch(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        data = getattr(self.buffer, "buffer", self.buffer)
        if data is None or len(data) == 0:
            return None
        idx = torch.randint(len(data), (min(self.replay_mb_size, len(data)),)).tolist()
        batch = default_collate([data[i] for i in idx])
        return batch[0], (batch[2] if len(batch) > 2 else None)

    def _layer_loss(self, s_layer, x_s, owners_s, t_layer, x_t, owners_t) -> torch.Tensor:
        raise NotImplementedError


def _check_task_labels(strategy, plugin: str) -> None:
    """ValueError, before any training, if the experience's samples carry no task label
    (the teacher is called with each mini-batch's task labels, ``(x, y, task)``)."""
    dataset = strategy.experience.dataset
    try:
        dataset.targets_task_labels  # noqa: B018 (Avalanche raises if the field is absent)
    except (AttributeError, KeyError):
        raise ValueError(
            f"{plugin} needs task labels: the samples of experience "
            f"{strategy.experience.current_experience} have none (a benchmark built without "
            "task labels). Build the stream with peer_ll.data.make_stream, or give each "
            "sample a task label (Avalanche's TaskLabels / as_classification_dataset)"
        ) from None


class RouterDistillation(_RoutingTeacher):
    """LwF on routing: KL between the teacher's and the student's routing distributions.

    Args:
        alpha: weight of the loss.
        temperature: softmax temperature τ over the candidates' scores.
        query_alpha: weight of an added query-matching term (as
            :class:`QueryDistillation`, without a second teacher). 0 gives pure LwF
            on routing.
        buffer: replayed samples to distill on as well: an Avalanche dataset, or an
            object with a ``.buffer`` dataset (an ``ExemplarsBuffer`` or a storage
            policy). Its items are ``(x, y[, task])``.
        replay_mb_size: samples drawn from ``buffer`` per step.

    Attributes:
        teacher: the frozen copy (None on the first experience).
        last_loss: the latest unweighted loss (NaN before the first).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        temperature: float = 1.0,
        query_alpha: float = 0.0,
        buffer=None,
        replay_mb_size: int = 32,
    ) -> None:
        super().__init__(alpha=alpha, buffer=buffer, replay_mb_size=replay_mb_size)
        if check_float("temperature", temperature, minimum=0.0) == 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.query_alpha = check_float("query_alpha", query_alpha, minimum=0.0)

    def _layer_loss(self, s_layer, x_s, owners_s, t_layer, x_t, owners_t) -> torch.Tensor:
        q_s = recompute_query(s_layer, x_s)  # (T, H, d), differentiable
        with torch.no_grad():
            q_t = recompute_query(t_layer, x_t)
        ids_s = recompute_ids(s_layer, x_s.detach(), owners_s)
        ids_t = recompute_ids(t_layer, x_t, owners_t)
        loss = routing_kl(s_layer, q_s, t_layer, q_t, ids_t, ids_s, temperature=self.temperature)
        if self.query_alpha:
            loss = loss + self.query_alpha * (q_s - q_t).pow(2).sum(-1).mean()
        return loss


class QueryDistillation(_RoutingTeacher):
    """Keeps the student's PEER queries close to the teacher's (mean squared error).

    Args:
        alpha: weight of the loss.
        buffer, replay_mb_size: as for :class:`RouterDistillation`.
    """

    def __init__(self, alpha: float = 1.0, *, buffer=None, replay_mb_size: int = 32) -> None:
        super().__init__(alpha=alpha, buffer=buffer, replay_mb_size=replay_mb_size)

    def _layer_loss(self, s_layer, x_s, owners_s, t_layer, x_t, owners_t) -> torch.Tensor:
        q_s = recompute_query(s_layer, x_s)
        with torch.no_grad():
            q_t = recompute_query(t_layer, x_t)
        return (q_s - q_t).pow(2).sum(-1).mean()


def peer_router_distillation(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    buffer=None,
    plugins: Iterable[object] = (),
    **kwargs,
):
    """:func:`peer_grow` plus :class:`RouterDistillation` (LwF on routing).

    Args:
        alpha, temperature, buffer: as for :class:`RouterDistillation`.
        plugins, **kwargs: as for :func:`peer_grow`.
    """
    distill = RouterDistillation(alpha, temperature=temperature, buffer=buffer)
    return peer_grow(model, optimizer, criterion, plugins=(*plugins, distill), **kwargs)
