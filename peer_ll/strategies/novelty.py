"""Task-free growth: grow a PEER pool when recent inputs fit no existing owner.

``GrowthPolicy(when=...)`` takes a callable ``when(growth, experience) -> GrowthDecision``
(or a bool). :class:`NoveltyTrigger` is the built-in one. It keeps, per owner it
created, running per-feature input statistics (a diagonal Gaussian, as
:class:`~peer_ll.protect.InputOwnerStats` fits per owner) and scores each input by its
mean squared z-score under its best owner, relative to that owner's own data (so an
input from a known owner scores about 1). The *signal* is the mean score of the last
``window`` inputs; the pool grows when it passes ``threshold``, at most once per
``cooldown`` inputs and while ``max_experts`` allows. Inputs that fit an owner
(score under the threshold) update that owner's statistics, so an owner follows slow
drift; novel inputs are kept out of them until a growth gives them an owner.

:class:`LossJumpTrigger` uses the other signal measured to work: the model's loss on the
new inputs, before training on them, over its loss on the recent ones (a supervised
stream has the labels when it trains). On online Split-Fashion-MNIST it separates the
task boundaries from the other mini-batches far better than the input statistics
(``benchmarks/growth_signals.py``).

Both need no task boundary: they work on Avalanche online streams
(``split_online_stream(..., access_task_boundaries=False)``) and data-incremental
streams alike, deciding once per experience however many PEER layers share it.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from torch import nn

from peer_ll.experts.checks import check_float, check_int, check_type

__all__ = ["GrowthDecision", "LossJumpTrigger", "NoveltyTrigger", "experience_inputs"]


class GrowthDecision(NamedTuple):
    """What a ``when`` callable decides for one experience.

    Attributes:
        grow: add a segment now.
        signal: the value the decision was taken on (None if it has none).
        reason: a short text for ``growth.events``.
    """

    grow: bool
    signal: float | None = None
    reason: str = "when=callable"


def experience_inputs(experience, limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` inputs of ``experience.dataset``, flattened: (N, F) float32."""
    dataset = experience.dataset
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if n == 0:
        return torch.zeros(0, 0)
    return torch.stack([torch.as_tensor(dataset[i][0]).flatten() for i in range(n)]).float()


class _Moments:
    """Running count, sum and sum of squares of one owner's inputs."""

    def __init__(self, x: torch.Tensor) -> None:
        self.n = x.shape[0]
        self.s = x.double().sum(0)
        self.ss = x.double().pow(2).sum(0)

    def add(self, x: torch.Tensor) -> None:
        self.n += x.shape[0]
        self.s += x.double().sum(0)
        self.ss += x.double().pow(2).sum(0)

    def scores(self, x: torch.Tensor, floor: float) -> torch.Tensor:
        """(N,) mean squared z-score of x relative to the owner's own inputs (about 1)."""
        mean = self.s / self.n
        var = (self.ss / self.n - mean.pow(2)).clamp_min(0)
        own = (var / (var + floor)).mean()  # the owner's own inputs' expected score
        z2 = (x.double() - mean).pow(2) / (var + floor)
        return (z2.mean(1) / own.clamp_min(1e-12)).float()


class _Trigger:
    """What both triggers share: window, threshold, cooldown, one decision per experience.

    A subclass sets its own fields and implements ``_decide(experience) -> GrowthDecision``.
    """

    def __init__(self, window: int, threshold: float, cooldown: int, floor: float,
                 max_inputs: int) -> None:  # fmt: skip
        self.window = check_int("window", window, minimum=1)
        self.threshold = check_float("threshold", threshold, minimum=0.0)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.floor = check_float("floor", floor, minimum=1e-12)
        self.max_inputs = check_int("max_inputs", max_inputs, minimum=1)
        self.recent: deque[float] = deque(maxlen=self.window)
        self.since_growth = 0
        self.history: list[tuple[int, float]] = []
        self._last: tuple[object, GrowthDecision] | None = None

    def __call__(self, growth, experience) -> GrowthDecision:
        """The decision for ``experience`` (the same one for every layer that asks)."""
        if self._last is not None and self._last[0] is experience:
            return self._last[1]
        decision = self._decide(experience)
        signal = float("nan") if decision.signal is None else decision.signal
        self.history.append((int(experience.current_experience), signal))
        self._last = (experience, decision)  # held, so no later experience shares its id
        return decision

    def __deepcopy__(self, memo):
        # One stream, one trigger: model copies (LwF's previous model, GDumb's initial
        # one) share it rather than copy the experience it holds.
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(window={self.window}, threshold={self.threshold}, "
                f"cooldown={self.cooldown}, floor={self.floor})")  # fmt: skip


class NoveltyTrigger(_Trigger):
    """Grow when the last ``window`` inputs are unlikely under every owner so far.

    Args:
        window: recent inputs whose mean score is the signal.
        threshold: grow when the signal passes it (1: as typical as an owner's own
            inputs; default 2: twice the owner's own spread).
        cooldown: inputs after a growth (or the first experience) before the next.
        floor: variance added to every feature, in squared input units, so features
            constant in an owner's data do not make every input novel.
        max_inputs: inputs read per experience (data-incremental experiences may be
            large; online experiences are small).

    Attributes:
        owners: the running statistics of each owner it created (0: the first data).
        history: ``(experience id, signal)`` of every decision.
    """

    def __init__(
        self,
        *,
        window: int = 100,
        threshold: float = 2.0,
        cooldown: int = 500,
        floor: float = 0.01,
        max_inputs: int = 1000,
    ) -> None:
        super().__init__(window, threshold, cooldown, floor, max_inputs)
        self.owners: list[_Moments] = []

    def _decide(self, experience) -> GrowthDecision:
        return self.observe(experience_inputs(experience, self.max_inputs))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) scores of inputs x (N, F) under each of the K owners."""
        return torch.stack([m.scores(x, self.floor) for m in self.owners], dim=1)

    def observe(self, x: torch.Tensor) -> GrowthDecision:
        """Takes the inputs x (N, F) of one experience and decides whether to grow."""
        if x.shape[0] == 0:
            return GrowthDecision(False, None, "novelty: empty experience")
        if not self.owners:
            self.owners.append(_Moments(x))
            return GrowthDecision(False, None, "novelty: first data")
        best, owner = self.scores(x).min(dim=1)  # (N,)
        self.recent.extend(best.tolist())
        self.since_growth += x.shape[0]
        signal = sum(self.recent) / len(self.recent)
        ready = len(self.recent) == self.window and self.since_growth >= self.cooldown
        if signal > self.threshold and ready:
            novel = best > self.threshold
            self.owners.append(_Moments(x[novel] if novel.any() else x))
            self.recent.clear()
            self.since_growth = 0
            return GrowthDecision(True, signal, f"novelty {signal:.3g} > {self.threshold}")
        for k in owner[best <= self.threshold].unique().tolist():
            self.owners[k].add(x[(owner == k) & (best <= self.threshold)])
        why = "cooldown" if signal > self.threshold else f"<= {self.threshold}"
        return GrowthDecision(False, signal, f"novelty {signal:.3g} {why}")


class LossJumpTrigger(_Trigger):
    """Grow when the model's loss on new inputs jumps above its loss on recent ones.

    Before an experience trains, the model (in eval mode, no gradient, every expert)
    scores its first ``max_inputs`` labelled inputs; the *signal* is their mean loss over
    the mean loss of the last ``window`` inputs seen before (1: as usual), the latter at
    least ``floor``. The pool grows when the signal passes ``threshold``, at most once per
    ``cooldown`` inputs.

    Args:
        model: the model being trained (called as ``model(x)``: logits (N, C)).
        window: earlier inputs whose mean loss is the reference.
        threshold: grow when the signal passes it.
        cooldown: inputs after a growth (or the first experience) before the next.
        max_inputs: inputs read per experience.
        floor: least reference loss (nats), so that a model fitting its data almost
            perfectly does not turn every small loss into a jump.

    Attributes:
        history: ``(experience id, signal)`` of every decision.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int = 200,
        threshold: float = 3.0,
        cooldown: int = 500,
        max_inputs: int = 1000,
        floor: float = 0.1,
    ) -> None:
        self.model = check_type("model", model, nn.Module)
        super().__init__(window, threshold, cooldown, floor, max_inputs)

    def _decide(self, experience) -> GrowthDecision:
        data = experience.dataset
        n = min(len(data), self.max_inputs)
        y = torch.tensor([int(data[i][1]) for i in range(n)], dtype=torch.long)
        return self.observe(experience_inputs(experience, n), y)

    @torch.no_grad()
    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) cross-entropy of the model on inputs x (N, F) with labels y (N,)."""
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            device = next(self.model.parameters(), torch.empty(0)).device
            logits = self.model(x.to(device)).float()
            return nn.functional.cross_entropy(logits, y.to(device), reduction="none").cpu()
        finally:
            for m, mode in modes.items():
                m.train(mode)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> GrowthDecision:
        """Takes the labelled inputs x (N, F), y (N,) of one experience and decides."""
        if x.shape[0] == 0:
            return GrowthDecision(False, None, "loss jump: empty experience")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        loss = self.losses(x, y)
        if not self.recent:
            self.recent.extend(loss.tolist())
            return GrowthDecision(False, None, "loss jump: first data")
        signal = float(loss.mean()) / max(sum(self.recent) / len(self.recent), self.floor)
        self.since_growth += x.shape[0]
        self.recent.extend(loss.tolist())
        if signal > self.threshold and self.since_growth >= self.cooldown:
            self.since_growth = 0
            return GrowthDecision(True, signal, f"loss jump {signal:.3g} > {self.threshold}")
        why = "cooldown" if signal > self.threshold else f"<= {self.threshold}"
        return GrowthDecision(False, signal, f"loss jump {signal:.3g} {why}")
