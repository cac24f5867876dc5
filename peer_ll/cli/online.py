"""Online streams in ``peer-ll run``: ``DATASET-online`` stream kinds.

An online stream is the class-incremental stream (:func:`peer_ll.data.make_stream`) cut by
Avalanche's ``split_online_stream`` into mini-experiences of ``batch_size`` samples,
trained for one pass each. The model is evaluated on the whole test stream at the end
of each base experience only (not after every mini-experience), so its accuracy
matrix has one row per base experience, as for the other kinds.

The PEER strategies other than ``peer-grow-online`` get the stream with
``access_task_boundaries=True``: Avalanche then adapts the model to each base
experience, so ``peer-grow`` grows once per base experience (the boundary-aware
reference). Every other strategy, and the task-free ``peer-grow-online``
(:class:`~peer_ll.strategies.NoveltyTrigger`), gets ``access_task_boundaries=False``.
"""

from __future__ import annotations

import logging
import math

from peer_ll.evaluation.report import evaluation_values

logger = logging.getLogger(__name__)

__all__ = ["online_checkpoints", "online_train_stream", "run_online"]


def online_train_stream(base, *, experience_size: int, seed: int, boundaries: bool):
    """``base``'s train stream cut into mini-experiences, afresh.

    Avalanche's online streams are one-shot generators: each run cuts its own.
    """
    from avalanche.benchmarks import split_online_stream

    return split_online_stream(base.train_stream, experience_size, shuffle=True, seed=seed,
                               access_task_boundaries=boundaries)  # fmt: skip


def online_checkpoints(base, experience_size: int) -> list[int]:
    """Indices of the mini-experiences that end each base experience."""
    ends, total = [], 0
    for exp in base.train_stream:
        total += math.ceil(len(exp.dataset) / experience_size)
        ends.append(total - 1)
    return ends


def run_online(strategy, base, *, experience_size: int, seed: int, boundaries: bool = False):
    """Trains on every mini-experience of ``base``; evaluates the test stream at the end
    of each base experience.

    Args:
        strategy: an Avalanche template (see :func:`peer_ll.cli.harness.evaluator`).
        base: the class-incremental benchmark the online stream is cut from.
        experience_size: samples per mini-experience.
        seed: seed of the shuffle inside each base experience.
        boundaries: let the strategy see the base experiences' boundaries.

    Returns:
        ``(rows, values)`` as :func:`peer_ll.cli.harness.run_stream`: one row per base
        experience, and the last evaluation's metric values.
    """
    test = base.test_stream
    t, marks = len(test), set(online_checkpoints(base, experience_size))
    rows, values = [], {}
    stream = online_train_stream(base, experience_size=experience_size, seed=seed,
                                 boundaries=boundaries)  # fmt: skip
    for i, exp in enumerate(stream):
        strategy.train(exp)
        if i in marks:
            values = strategy.eval(test)
            rows.append(evaluation_values(values, t))
            logger.info("online: mini-experience %d, accuracy %s", i + 1,
                        [round(a, 4) for a in rows[-1]["accuracy"]])  # fmt: skip
    return rows, values
