"""An Avalanche plugin metric that fills the accuracy matrix and emits its metrics.

:class:`AccuracyMatrix` records R[i][j], the accuracy on evaluation experience j after
training experience i, from every evaluation run between ``train`` calls (periodic
evaluations inside training are ignored). After each such evaluation it emits, over
the experiences trained so far (the leading square block of R), the metrics of
:mod:`peer_ll.evaluation.metrics`:

- ``CL_AvgAccuracy``, ``CL_BWT``, ``CL_Forgetting`` (Chaudhry et al.'s max kind),
  ``CL_LearningAccuracy``;
- ``CL_FWT`` if the model was evaluated before any training;
- ``CL_Intransigence`` if a joint-training reference is given.

Names follow Avalanche's stream-level scheme, e.g. ``CL_BWT/eval_phase/test_stream``.
It assumes experience i of the training stream matches experience i of the
evaluation stream, as in Avalanche's benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name

from peer_ll.evaluation.metrics import (
    average_accuracy,
    bwt,
    forgetting,
    fwt,
    intransigence,
    learning_accuracy,
)

__all__ = ["AccuracyMatrix"]


class AccuracyMatrix(PluginMetric[dict]):
    """Fills R[i][j] from evaluations after training experiences; emits its metrics.

    Args:
        joint: (T,) accuracies of a jointly trained model on each experience, for
            ``CL_Intransigence`` (optional).

    Attributes:
        matrix: (rows, T) array; row i after training experience i, NaN where not
            evaluated.
        initial: (T,) accuracies before any training (NaN if not evaluated).
    """

    def __init__(self, joint: Sequence[float] | None = None) -> None:
        super().__init__()
        self.joint = None if joint is None else [float(a) for a in joint]
        self.reset()

    def reset(self) -> None:
        self._rows: dict[int, dict[int, float]] = {}
        self._initial: dict[int, float] = {}
        self._in_training = False
        self._correct = self._total = 0
        self._last: dict[str, float] = {}

    def result(self) -> dict[str, float]:
        """The values emitted after the latest evaluation, by metric name."""
        return dict(self._last)

    @property
    def matrix(self) -> np.ndarray:
        rows = max(self._rows, default=-1) + 1
        cols = 1 + max([j for r in self._rows.values() for j in r] + list(self._initial) + [-1])
        out = np.full((rows, cols), np.nan)
        for i, row in self._rows.items():
            for j, acc in row.items():
                out[i, j] = acc
        return out

    @property
    def initial(self) -> np.ndarray:
        cols = self.matrix.shape[1]
        return np.array([self._initial.get(j, np.nan) for j in range(cols)])

    # ------------------------------------------------------------------ hooks
    def before_training_exp(self, strategy) -> None:
        self._in_training = True

    def after_training_exp(self, strategy) -> None:
        self._in_training = False

    def before_eval_exp(self, strategy) -> None:
        self._correct = self._total = 0

    def after_eval_iteration(self, strategy) -> None:
        super().after_eval_iteration(strategy)
        pred = strategy.mb_output.argmax(dim=-1)
        self._correct += int((pred == strategy.mb_y).sum())
        self._total += len(strategy.mb_y)

    def after_eval_exp(self, strategy) -> None:
        if self._in_training or not self._total:
            return
        j = int(strategy.experience.current_experience)
        trained = int(strategy.clock.train_exp_counter)
        row = self._initial if trained == 0 else self._rows.setdefault(trained - 1, {})
        row[j] = self._correct / self._total

    def after_eval(self, strategy) -> list[MetricValue] | None:
        trained = int(strategy.clock.train_exp_counter)
        if self._in_training or trained == 0:
            return None
        n = trained  # experiences trained so far: the leading n x n block
        block = np.full((n, n), np.nan)
        full = self.matrix
        block[: min(n, full.shape[0]), : min(n, full.shape[1])] = full[:n, :n]
        values = {
            "CL_AvgAccuracy": average_accuracy(block),
            "CL_BWT": bwt(block),
            "CL_Forgetting": forgetting(block, kind="max"),
            "CL_LearningAccuracy": learning_accuracy(block),
        }
        initial = self.initial
        if len(initial) >= n and not np.isnan(initial[:n]).all():
            values["CL_FWT"] = fwt(block, initial[:n])
        if self.joint is not None and len(self.joint) >= n:
            values["CL_Intransigence"] = intransigence(block, self.joint[:n])
        x = strategy.clock.train_iterations
        out = [
            MetricValue(self, get_metric_name(k, strategy, add_task=False), v, x)
            for k, v in values.items()
        ]
        self._last = {m.name: m.value for m in out}
        return out

    def __str__(self) -> str:
        return "CL_AccuracyMatrix"
