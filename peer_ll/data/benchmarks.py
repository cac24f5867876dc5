"""Benchmarks from a user's own experiences, and the class count of any benchmark.

``n_classes`` of a benchmark is what a model's output must cover: the number of
distinct class ids its labels take over the train stream. Avalanche's
``nc_benchmark(one_dataset_per_exp=True)`` (behind its PermutedMNIST and
RotatedMNIST) offsets the classes of every experience, so it reports experiences x
classes although the labels are remapped to the same ids in each; ``with_class_count``
corrects that. On task-labelled benchmarks a given ``n_classes`` is kept: there it is
Avalanche's count of original classes, and task heads use the classes per experience.
"""

from __future__ import annotations

import logging

import numpy as np

from peer_ll.data.images import ImageDataset, balanced_indices

__all__ = ["class_count", "split_by_task", "with_class_count"]

logger = logging.getLogger(__name__)


def _classes_of(exp) -> set[int]:
    classes = getattr(exp, "classes_in_this_experience", None)
    if classes is None:  # experiences of Avalanche's newer generic benchmarks
        classes = exp.dataset.targets.uniques
    return {int(c) for c in classes}


def class_count(bench) -> int:
    """The number of classes a model for ``bench`` must output (see the module docstring).

    Args:
        bench: an Avalanche benchmark with a ``train_stream``.

    Returns:
        The distinct class ids over the train stream; a task-labelled benchmark's own
        ``n_classes`` when it has one.

    Raises:
        TypeError: ``bench`` has no ``train_stream``.
        ValueError: a lazy train stream (e.g. online) and no ``n_classes`` attribute.
    """
    stream = getattr(bench, "train_stream", None)
    if stream is None:
        raise TypeError(f"bench must be an Avalanche benchmark, got {type(bench).__name__}")
    try:
        n_exps = len(stream)
    except TypeError:  # a lazy stream: counting would consume it
        n_exps = None
    given = getattr(bench, "n_classes", None)
    if n_exps is None:
        if given is None:
            raise ValueError(
                "bench has a lazy train stream and no n_classes attribute; build the "
                "online stream from a benchmark that has one"
            ) from None
        return int(given)
    tasks = {int(t) for exp in stream for t in getattr(exp, "task_labels", [0])}
    if given is not None and len(tasks) > 1:
        return int(given)
    return len(set().union(*(_classes_of(exp) for exp in stream)))


def with_class_count(bench):
    """Sets ``bench.n_classes`` to ``class_count(bench)`` and returns ``bench``."""
    count = class_count(bench)
    old = getattr(bench, "n_classes", None)
    if old is not None and old != count:
        logger.info("n_classes of %s corrected from %s to %d", type(bench).__name__, old, count)
    bench.n_classes = count
    return bench


def split_by_task(
    data,
    *,
    task_labels: bool,
    flatten: bool = True,
    seed: int = 0,
    max_train_per_exp: int | None = None,
    max_test_per_exp: int | None = None,
):
    """One experience per task label of a user's data, in sorted order of the labels.

    Args:
        data: ``UserSplits`` with ``train_tasks`` and ``test_tasks``.
        task_labels: True: experience e carries task label e, and its class ids are
            renumbered 0..c_e-1 in sorted order (as the ``"task"`` streams do); False:
            task label 0 and the class ids kept (class- or domain-incremental).
        flatten: samples of shape (F,) / (H*W,) if True, else (1, F) / (1, H, W).
        seed: seed of the subsamples.
        max_train_per_exp, max_test_per_exp: keep at most that many samples per
            experience, balanced over its classes.

    Returns:
        An Avalanche ``ClassificationScenario`` (``dataset_benchmark``) whose
        ``n_classes`` is the number of classes in ``data``.

    Raises:
        ValueError: a task label, or with ``task_labels`` a class of a task, that the
            test split has and training does not.
    """
    from avalanche.benchmarks import dataset_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset as aware

    tasks = np.unique(data.train_tasks)
    unseen = np.setdiff1d(data.test_tasks, tasks)
    if len(unseen):
        raise ValueError(f"test task labels must all occur in training, got also {unseen[:5]}")
    rng = np.random.default_rng(seed)
    streams: tuple[list, list] = ([], [])
    for e, task in enumerate(tasks):
        for images, labels, owners, limit, out in (
            (data.train_images, data.train_labels, data.train_tasks, max_train_per_exp,
             streams[0]),
            (data.test_images, data.test_labels, data.test_tasks, max_test_per_exp, streams[1]),
        ):  # fmt: skip
            members = np.flatnonzero(owners == task)
            members = members[balanced_indices(labels[members], limit, rng)]
            y = labels[members]
            if task_labels:
                known = np.unique(data.train_labels[data.train_tasks == task])
                if not np.isin(y, known).all():
                    raise ValueError(
                        f"test classes of task {task} must all occur in its training samples, "
                        f"got also {np.setdiff1d(y, known)[:5]}"
                    )
                y = np.searchsorted(known, y)
            dataset = ImageDataset(images[members], y, data.max_value, flatten)
            out.append(aware(dataset, task_labels=e if task_labels else 0))
    bench = dataset_benchmark(*streams)
    bench.n_classes = data.n_classes
    return bench
