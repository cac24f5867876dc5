"""The experiment harness: train a strategy along a stream and evaluate after each step.

``peer-ll run`` (:mod:`peer_ll.cli.compare`) and the benchmark scripts share it:

- :func:`evaluator`: Avalanche's accuracy, forgetting and BWT metrics, the accuracy
  matrix and the peer_ll plugin metrics, in one ``EvaluationPlugin``;
- :func:`run_stream`: the run loop; one :func:`~peer_ll.evaluation.report.evaluation_values`
  row per training experience (joint training: one training, its row repeated);
- :func:`quiet_avalanche`, :func:`cpu_threads`, :func:`log_file`: the run's surroundings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from peer_ll.cli.checkpoints import load_stream_checkpoint, save_stream_checkpoint
from peer_ll.evaluation.report import evaluation_values
from peer_ll.experts.checks import check_choice

logger = logging.getLogger(__name__)

#: What a run evaluates after each training experience.
EVALUATE = ("all", "seen")


def evaluator(log_file: IO[str] | None = None, *, confidence: bool = True,
              plasticity: bool = True, routing: bool = True):  # fmt: skip
    """The ``EvaluationPlugin`` of a run.

    Args:
        log_file: an open text file for Avalanche's ``TextLogger`` (no logger if None).
        confidence: emit the retrieval confidence of every PEER layer.
        plasticity: emit the dead-unit fraction and effective rank.
        routing: emit the routing metrics (False for a model without PEER layers).
    """
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    from peer_ll.evaluation.matrix_plugin import AccuracyMatrix
    from peer_ll.evaluation.plugins import peer_metrics

    return EvaluationPlugin(
        accuracy_metrics(experience=True),
        AccuracyMatrix(),
        forgetting_metrics(stream=True),
        bwt_metrics(stream=True),
        *peer_metrics(routing=routing, confidence=confidence, plasticity=plasticity),
        loggers=[TextLogger(log_file)] if log_file is not None else [],
    )


def run_stream(
    strategy,
    bench,
    *,
    joint: bool = False,
    evaluate: str = "all",
    progress: bool = False,
    desc: str = "train",
    checkpoint: str | Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Trains ``strategy`` on ``bench.train_stream``, evaluating after each experience.

    Args:
        strategy: an Avalanche template whose evaluator emits the metrics that
            :func:`~peer_ll.evaluation.report.evaluation_values` reads (see :func:`evaluator`).
        bench: an Avalanche benchmark with T experiences in each stream.
        joint: train once on the whole training stream (``JointTraining``); every row is
            that one evaluation.
        evaluate: ``"all"``: the whole test stream after each experience (the full
            accuracy matrix); ``"seen"``: only the experiences trained so far (its lower
            triangle, NaN above).
        progress: show a progress bar over the experiences.
        desc: the progress bar's label.
        checkpoint: a file for Avalanche's ``save_checkpoint`` (see
            :mod:`peer_ll.cli.checkpoints`), written atomically after each experience
            with the rows so far and the random states; a run that finds it continues
            after its last finished experience, bit for bit. Ignored with ``joint``.

    Returns:
        ``(rows, values)``: T rows of ``evaluation_values`` (row i: after training
        experience i) and the metric values of the last evaluation by name.
    """
    check_choice("evaluate", evaluate, EVALUATE)
    train, test = bench.train_stream, bench.test_stream
    t = len(test)
    if joint:
        strategy.train(train)
        values = strategy.eval(test)
        return [evaluation_values(values, t)] * t, values
    rows: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    if checkpoint is not None:
        rows, values = load_stream_checkpoint(strategy, checkpoint)
    todo = train[len(rows) :] if rows else train
    bar = tqdm(todo, desc=desc, leave=False, disable=not progress, initial=len(rows), total=t)
    for i, exp in enumerate(bar, start=len(rows)):
        strategy.train(exp)
        values = strategy.eval(test if evaluate == "all" else test[: i + 1])
        rows.append(evaluation_values(values, t))
        logger.info(
            "%s: experience %d/%d, accuracy %s",
            desc,
            i + 1,
            t,
            [round(a, 4) for a in rows[-1]["accuracy"]],
        )
        if checkpoint is not None:
            save_stream_checkpoint(strategy, checkpoint, rows, values)
    return rows, values


@contextlib.contextmanager
def quiet_avalanche() -> Iterator[None]:
    """Drops warnings raised inside Avalanche (its deprecations reset warning filters)."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if f"{os.sep}avalanche{os.sep}" not in str(filename):
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield


@contextlib.contextmanager
def log_file(log_dir: str | Path | None, name: str, *,
             append: bool = False) -> Iterator[IO[str] | None]:  # fmt: skip
    """``log_dir/name`` opened for writing or ``append`` (folders made), or None without
    ``log_dir``."""
    if log_dir is None:
        yield None
        return
    path = Path(log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as handle:
        yield handle


def cpu_threads(threads: int):
    """Uses ``threads`` threads in torch and in the BLAS libraries numpy calls."""
    torch.set_num_threads(max(1, threads))
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(max(1, threads))


class NonFiniteLoss(FloatingPointError):
    """A training loss was NaN or infinite: the strategy's run is stopped."""


def finite_loss_plugin():
    """An Avalanche plugin that stops training with :class:`NonFiniteLoss` before a
    backward pass on a NaN or infinite loss (nothing non-finite reaches the weights)."""
    from avalanche.core import SupervisedPlugin

    class FiniteLoss(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            loss = strategy.loss
            if not torch.isfinite(loss).all():
                clock = strategy.clock
                raise NonFiniteLoss(
                    f"the training loss is {loss.item()} at experience "
                    f"{clock.train_exp_counter + 1}, epoch {clock.train_exp_epochs + 1}, "
                    f"iteration {clock.train_epoch_iterations + 1}: lower --lr or check the data"
                )

    return FiniteLoss()
