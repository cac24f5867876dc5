"""Task streams on image data or a user's arrays, returned as Avalanche benchmarks.

``make_stream`` is the entry point: a dataset name, a user's ``(X, y[, task])``
arrays (``peer_ll.data.arrays``) or an Avalanche benchmark. Every builder takes an
``ImageSplits`` (see ``peer_ll.data.images``) and returns a benchmark with
``train_stream``, ``test_stream`` and ``n_classes``. A sample is ``(x, y, t)``: x is
float32 in [0, 1] for images (a user's features as given), of shape (H*W,) with
``flatten=True`` (the default) or (1, H, W) otherwise; y is an int class id; t the
task label.
``max_train_per_exp`` / ``max_test_per_exp`` keep at most that many samples
per experience, balanced over classes and chosen by ``seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peer_ll.data.benchmarks import class_count, split_by_task, with_class_count
from peer_ll.data.domains import permuted, rotated, train_test_datasets
from peer_ll.data.images import IMAGE_DATASETS, ImageSplits, balanced_indices, load_images
from peer_ll.experts.checks import check_choice, check_int

__all__ = [
    "STREAM_KINDS", "make_stream", "online", "online_of", "permuted", "rotated", "split_classes",
]  # fmt: skip

STREAM_KINDS = ("class", "task", "permuted", "rotated", "online")


def split_classes(
    dataset: ImageSplits,
    *,
    n_experiences: int = 5,
    task_labels: bool = False,
    seed: int = 0,
    flatten: bool = True,
    max_train_per_exp: int | None = None,
    max_test_per_exp: int | None = None,
):
    """Class-incremental (or task-incremental) split: disjoint classes per experience.

    The class order is a permutation drawn from ``seed``. With C classes the
    first ``C % n_experiences`` experiences get one class more than the rest.
    With ``task_labels=True`` experience e has task label e and, as in
    Avalanche's SplitMNIST(return_task_id=True), its class ids are remapped to
    0..c_e-1 (``class_ids_from_zero_in_each_exp``); otherwise task label 0 and
    the original class ids are kept.

    Returns:
        An Avalanche ``NCScenario`` (``nc_benchmark``) with ``n_experiences``
        experiences in ``train_stream`` and ``test_stream``.
    """
    from avalanche.benchmarks import nc_benchmark

    n_classes = dataset.n_classes
    check_int("n_experiences", n_experiences, minimum=1, maximum=n_classes)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_classes)
    sizes = [
        n_classes // n_experiences + (e < n_classes % n_experiences) for e in range(n_experiences)
    ]
    exp_of_class = np.empty(n_classes, dtype=np.int64)
    exp_of_class[order] = np.repeat(np.arange(n_experiences), sizes)
    train_idx, test_idx = [], []
    for e in range(n_experiences):
        for labels, limit, out in (
            (dataset.train_labels, max_train_per_exp, train_idx),
            (dataset.test_labels, max_test_per_exp, test_idx),
        ):
            members = np.flatnonzero(exp_of_class[labels] == e)
            out.append(members[balanced_indices(labels[members], limit, rng)])
    train, test = train_test_datasets(
        dataset, flatten, np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    )
    return nc_benchmark(
        train,
        test,
        n_experiences,
        task_labels=task_labels,
        fixed_class_order=order.tolist(),
        per_exp_classes={e: s for e, s in enumerate(sizes)},
        class_ids_from_zero_in_each_exp=task_labels,
    )


def online(
    dataset: ImageSplits,
    *,
    base: str = "class",
    experience_size: int = 10,
    seed: int = 0,
    access_task_boundaries: bool = False,
    **base_kwargs: Any,
):
    """Online stream: a base stream cut into small experiences, for one pass.

    Builds the ``base`` stream (``"class"``, ``"task"``, ``"permuted"`` or
    ``"rotated"``; ``base_kwargs`` go to its builder) and splits its train
    stream with Avalanche's ``split_online_stream`` into experiences of
    ``experience_size`` shuffled samples (the last one of each base experience
    may be smaller). Train each with ``train_epochs=1`` and
    ``train_mb_size=experience_size`` for a single pass.

    Returns:
        An Avalanche ``CLScenario`` with a lazy ``train_stream`` of
        ``OnlineCLExperience`` (``origin_experience``, ``is_last_subexp``...;
        visible to strategies only with ``access_task_boundaries=True``), the
        base ``test_stream``, and the base train stream as ``original_train_stream``.
    """
    builders = {
        "class": split_classes,
        "task": split_classes,
        "permuted": permuted,
        "rotated": rotated,
    }
    check_choice("base", base, sorted(builders))
    check_int("experience_size", experience_size, minimum=1)
    if base in ("class", "task"):
        base_kwargs["task_labels"] = base == "task"
    bm = builders[base](dataset, seed=seed, **base_kwargs)
    return online_of(bm, experience_size=experience_size, seed=seed,
                     access_task_boundaries=access_task_boundaries)  # fmt: skip


def online_of(bm, *, experience_size: int = 10, seed: int = 0,
              access_task_boundaries: bool = False):  # fmt: skip
    """``bm``'s train stream cut into experiences of ``experience_size`` samples (see ``online``).

    Args:
        bm: any Avalanche benchmark with a ``train_stream`` and a ``test_stream``.
        experience_size: samples per online experience.
        seed: seed of the shuffle inside each base experience.
        access_task_boundaries: let strategies see the base experiences' boundaries.

    Returns:
        An Avalanche ``CLScenario`` as ``online`` describes, with ``n_classes`` of ``bm``.
    """
    from avalanche.benchmarks import split_online_stream
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario, CLStream

    check_int("experience_size", experience_size, minimum=1)
    n_classes = class_count(bm)
    stream = split_online_stream(
        bm.train_stream,
        experience_size,
        shuffle=True,
        seed=seed,
        access_task_boundaries=access_task_boundaries,
    )
    original = CLStream("original_train", iter(bm.train_stream), set_stream_info=False)
    scenario = CLScenario([CLStream("train", iter(stream)), bm.test_stream, original])
    scenario.n_classes = n_classes
    return scenario


def make_stream(
    data: Any,
    *,
    kind: str | None = None,
    n_experiences: int | None = None,
    seed: int = 0,
    root: Any = None,
    test: tuple | None = None,
    test_fraction: float | None = None,
    **kwargs: Any,
):
    """Builds a stream of the given kind on a named dataset, a user's arrays, or a benchmark.

    Args:
        data: one of
            - a name in ``IMAGE_DATASETS``: ``"digits"``, ``"fashion-mnist"``, ``"mnist"``;
            - a user's arrays or tensors ``(X, y)`` or ``(X, y, task_labels)``
              (``peer_ll.data.arrays``: X (N, F) or (N, H, W), any real dtype, cast to
              float32; integer labels, renumbered 0..C-1), e.g. from ``load_arrays``;
            - an Avalanche benchmark, returned as is with ``n_classes`` set to its class
              count (``peer_ll.data.benchmarks.class_count``), or cut into an online
              stream with ``kind="online"``.
        kind: one of ``STREAM_KINDS``: ``"class"`` and ``"task"`` (``split_classes``
            without / with task labels), ``"permuted"``, ``"rotated"`` (images only),
            ``"online"`` (a class-incremental base unless ``base=`` is passed). With
            task labels in ``data``, these define the experiences (``split_by_task``):
            ``"class"`` hides them, ``"task"`` gives them, ``"online"`` cuts either
            (``base=``); permuted and rotated do not apply. For a benchmark: None or
            ``"online"``.
        n_experiences: number of (base) experiences; None keeps the builder's
            default (5; 10 for permuted), or the number of task labels.
        seed: seed of the splits, class order, permutations and subsamples.
        root: folder of the IDX files (see ``peer_ll.data.images``). Names only.
        test: a user's test arrays, like ``data``; None holds out ``test_fraction``
            of ``data`` (stratified by class and task). Arrays only.
        test_fraction: see ``test``; None is 0.2. Arrays only.
        **kwargs: passed to the builder, e.g. ``flatten``, ``max_train_per_exp``,
            ``angles``, ``experience_size``.

    Returns:
        The Avalanche benchmark; its ``n_classes`` counts the classes its labels
        take (on task-labelled streams, the classes of the data set).

    Raises:
        TypeError: ``data`` of another type, or arrays of a bad dtype.
        ValueError: an unknown name or kind, a kind that does not apply, bad shapes,
            lengths or counts; messages name the argument.
    """
    arrays = isinstance(data, (tuple, list))
    for arg, value, applies in (
        ("root", root, isinstance(data, str)),
        ("test", test, arrays),
        ("test_fraction", test_fraction, arrays),
    ):
        if value is not None and not applies:
            raise ValueError(f"{arg} must be None for data of type {type(data).__name__}")
    if hasattr(data, "train_stream"):
        return _from_benchmark(data, kind, n_experiences, seed, kwargs)
    check_choice("kind", kind, STREAM_KINDS)
    if isinstance(data, str):
        if data not in IMAGE_DATASETS:
            raise ValueError(f"data must be a name in {list(IMAGE_DATASETS)}, got {data!r}")
        splits = load_images(data, root=root, seed=seed)
    elif arrays:
        from peer_ll.data.arrays import user_splits

        fraction = 0.2 if test_fraction is None else test_fraction
        splits = user_splits(data, test=test, test_fraction=fraction, seed=seed)
        if splits.train_tasks is not None:
            return _by_task(splits, kind, n_experiences, seed, kwargs)
    else:
        raise TypeError(
            "data must be a dataset name, a tuple (X, y[, task_labels]) of arrays or "
            f"an Avalanche benchmark, got {type(data).__name__}"
        )
    if n_experiences is not None:
        kwargs["n_experiences"] = n_experiences
    if kind in ("class", "task"):
        return split_classes(splits, task_labels=kind == "task", seed=seed, **kwargs)
    builder = {"permuted": permuted, "rotated": rotated, "online": online}[kind]
    return builder(splits, seed=seed, **kwargs)


def _by_task(splits, kind: str, n_experiences: int | None, seed: int, kwargs: dict):
    """A stream with one experience per task label of a user's data."""
    n_tasks = len(np.unique(splits.train_tasks))
    if n_experiences is not None and n_experiences != n_tasks:
        raise ValueError(
            f"n_experiences must be None or the {n_tasks} task labels of data, got {n_experiences}"
        )
    base = kwargs.pop("base", "class") if kind == "online" else kind
    if base not in ("class", "task"):
        raise ValueError(
            f"kind must be 'class', 'task' or 'online' (base 'class' or 'task') on data with "
            f"task labels, which define the experiences, got kind={kind!r}, base={base!r}"
        )
    online_args = {k: kwargs.pop(k) for k in ("experience_size", "access_task_boundaries")
                   if k in kwargs and kind == "online"}  # fmt: skip
    bench = split_by_task(splits, task_labels=base == "task", seed=seed, **kwargs)
    return online_of(bench, seed=seed, **online_args) if kind == "online" else bench


def _from_benchmark(bench, kind: str | None, n_experiences: int | None, seed: int, kwargs):
    """A user's Avalanche benchmark: as is, or cut into an online stream."""
    if kind not in (None, "online"):
        raise ValueError(
            f"kind must be None or 'online' for an Avalanche benchmark (its experiences are "
            f"given), got {kind!r}"
        )
    if n_experiences is not None:
        raise ValueError(
            f"n_experiences must be None for an Avalanche benchmark, got {n_experiences}"
        )
    if kind == "online":
        return online_of(bench, seed=seed, **kwargs)
    if kwargs:
        raise ValueError(f"an Avalanche benchmark takes no builder arguments, got {sorted(kwargs)}")
    return with_class_count(bench)
