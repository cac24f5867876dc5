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
    rows = []
    for i, exp in enumerate(tqdm(train, desc=desc, leave=False, disable=not progress)):
        strategy.train(exp)
        values = strategy.eval(test if evaluate == "all" else test[: i + 1])
        rows.append(evaluation_values(values, t))
        logger.info("%s: experience %d/%d, accuracy %s", desc, i + 1, t,
                    [round(a, 4) for a in rows[-1]["accuracy"]])
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
def log_file(log_dir: str | Path | None, name: str) -> Iterator[IO[str] | None]:
    """``log_dir/name`` opened for writing (folders made), or None without ``log_dir``."""
    if log_dir is None:
        yield None
        return
    path = Path(log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        yield handle


def cpu_threads(threads: int):
    """Uses ``threads`` threads in torch and in the BLAS libraries numpy calls."""
    torch.set_num_threads(max(1, threads))
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(max(1, threads))
