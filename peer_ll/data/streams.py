"""Task streams on image data, returned as Avalanche benchmarks.

Every builder takes an ``ImageSplits`` (see ``peer_ll.data.images``) and returns
a benchmark with ``train_stream`` and ``test_stream``. A sample is
``(x, y, t)``: x is float32 in [0, 1], of shape (H*W,) with ``flatten=True``
(the default) or (1, H, W) otherwise; y is an int class id; t the task label.
``max_train_per_exp`` / ``max_test_per_exp`` keep at most that many samples
per experience, balanced over classes and chosen by ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from peer_ll.data.images import (
    IMAGE_DATASETS,
    ImageDataset,
    ImageSplits,
    balanced_indices,
    load_images,
)

__all__ = ["STREAM_KINDS", "make_stream", "online", "permuted", "rotated", "split_classes"]

STREAM_KINDS = ("class", "task", "permuted", "rotated", "online")


def _datasets(data: ImageSplits, flatten: bool, train_idx=slice(None), test_idx=slice(None)):
    """(train, test) torch datasets over the given indices of ``data``."""
    return (
        ImageDataset(
            data.train_images[train_idx], data.train_labels[train_idx], data.max_value, flatten
        ),
        ImageDataset(
            data.test_images[test_idx], data.test_labels[test_idx], data.max_value, flatten
        ),
    )


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
    if not 1 <= n_experiences <= n_classes:
        raise ValueError(f"n_experiences must be in [1, {n_classes}]; got {n_experiences}")
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
    train, test = _datasets(
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


def _domain_benchmark(pairs: list, *, task_labels: bool):
    """One experience per (train, test) dataset pair; every experience has all classes."""
    from avalanche.benchmarks import nc_benchmark

    trains, tests = zip(*pairs, strict=True)
    return nc_benchmark(
        list(trains),
        list(tests),
        len(pairs),
        task_labels=task_labels,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )


def _subsampled(dataset: ImageSplits, seed: int, max_train, max_test) -> ImageSplits:
    """The same images for every domain experience, at most max_* of them."""
    rng = np.random.default_rng(seed)
    tr = balanced_indices(dataset.train_labels, max_train, rng)
    te = balanced_indices(dataset.test_labels, max_test, rng)
    return replace(
        dataset,
        train_images=dataset.train_images[tr],
        train_labels=dataset.train_labels[tr],
        test_images=dataset.test_images[te],
        test_labels=dataset.test_labels[te],
    )


def permuted(
    dataset: ImageSplits,
    *,
    n_experiences: int = 10,
    seed: int = 0,
    keep_first: bool = False,
    task_labels: bool = False,
    flatten: bool = True,
    max_train_per_exp: int | None = None,
    max_test_per_exp: int | None = None,
):
    """Permuted domain-incremental stream (Goodfellow et al. 2013; Avalanche PermutedMNIST).

    Experience e applies one fixed pixel permutation, drawn from ``seed``, to
    all its train and test images; every experience has all classes. As in
    Avalanche's PermutedMNIST every experience is permuted, unless
    ``keep_first=True`` leaves experience 0 as the original images.

    Returns:
        An Avalanche ``NCScenario`` with ``n_experiences`` experiences.
    """
    from avalanche.benchmarks.classic.cmnist import PixelsPermutation
    from avalanche.benchmarks.utils import as_classification_dataset, make_avalanche_dataset
    from avalanche.benchmarks.utils.transform_groups import DefaultTransformGroups

    if n_experiences < 1:
        raise ValueError(f"n_experiences must be >= 1; got {n_experiences}")
    data = _subsampled(dataset, seed, max_train_per_exp, max_test_per_exp)
    rng = np.random.default_rng(seed)
    n_pixels = int(np.prod(dataset.image_shape))
    pairs = []
    for e in range(n_experiences):
        perm = None if (keep_first and e == 0) else torch.from_numpy(rng.permutation(n_pixels))
        pair = [as_classification_dataset(d) for d in _datasets(data, flatten)]
        if perm is not None:  # a frozen transform: applied in train and eval, as PermutedMNIST
            groups = DefaultTransformGroups((PixelsPermutation(perm), None))
            pair = [make_avalanche_dataset(d, frozen_transform_groups=groups) for d in pair]
        pairs.append(pair)
    return _domain_benchmark(pairs, task_labels=task_labels)


def rotated(
    dataset: ImageSplits,
    *,
    angles: Sequence[float] | None = None,
    n_experiences: int | None = None,
    seed: int = 0,
    task_labels: bool = False,
    flatten: bool = True,
    max_train_per_exp: int | None = None,
    max_test_per_exp: int | None = None,
):
    """Rotated domain-incremental stream (Avalanche RotatedMNIST-like).

    Experience e shows every image rotated counter-clockwise by ``angles[e]``
    degrees (bilinear, about the image centre, corners filled with 0).
    ``angles`` defaults to ``n_experiences`` (default 5) angles evenly spaced
    in [0, 180), so experience 0 is unrotated; when given, it sets the number
    of experiences. Rotated images are computed once, in batch, and rounded
    back to integer pixels; ``seed`` only picks the subsample.

    Returns:
        An Avalanche ``NCScenario`` with ``len(angles)`` experiences.
    """
    from avalanche.benchmarks.utils import as_classification_dataset

    if angles is None:
        n = 5 if n_experiences is None else n_experiences
        if n < 1:
            raise ValueError(f"n_experiences must be >= 1; got {n}")
        angles = [180.0 * e / n for e in range(n)]
    if len(angles) == 0:
        raise ValueError("angles must hold at least one angle; got an empty sequence")
    if n_experiences is not None and n_experiences != len(angles):
        raise ValueError(
            f"n_experiences must equal len(angles) = {len(angles)} when both are given; "
            f"got {n_experiences}"
        )
    data = _subsampled(dataset, seed, max_train_per_exp, max_test_per_exp)
    pairs = []
    for angle in angles:
        turned = replace(
            data,
            train_images=_rotate(data.train_images, float(angle), data.max_value),
            test_images=_rotate(data.test_images, float(angle), data.max_value),
        )
        pairs.append([as_classification_dataset(d) for d in _datasets(turned, flatten)])
    return _domain_benchmark(pairs, task_labels=task_labels)


def _rotate(images: np.ndarray, angle: float, max_value: float) -> np.ndarray:
    """Rotates (N, H, W) integer images counter-clockwise by ``angle`` degrees."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    if angle % 360 == 0:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(torch.float32)
    x = rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    return x.round_().clamp_(0, max_value).squeeze(1).numpy().astype(images.dtype)


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
    from avalanche.benchmarks import split_online_stream
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario, CLStream

    builders = {
        "class": split_classes,
        "task": split_classes,
        "permuted": permuted,
        "rotated": rotated,
    }
    if base not in builders:
        raise ValueError(f"base must be one of {sorted(builders)}; got {base!r}")
    if experience_size < 1:
        raise ValueError(f"experience_size must be >= 1; got {experience_size}")
    if base in ("class", "task"):
        base_kwargs["task_labels"] = base == "task"
    bm = builders[base](dataset, seed=seed, **base_kwargs)
    stream = split_online_stream(
        bm.train_stream,
        experience_size,
        shuffle=True,
        seed=seed,
        access_task_boundaries=access_task_boundaries,
    )
    original = CLStream("original_train", iter(bm.train_stream), set_stream_info=False)
    return CLScenario([CLStream("train", iter(stream)), bm.test_stream, original])


def make_stream(
    name: str,
    *,
    kind: str,
    n_experiences: int | None = None,
    seed: int = 0,
    root: Any = None,
    **kwargs: Any,
):
    """Loads a dataset by name and builds a stream of the given kind.

    Args:
        name: one of ``IMAGE_DATASETS``: ``"digits"``, ``"fashion-mnist"``, ``"mnist"``.
        kind: one of ``STREAM_KINDS``: ``"class"`` and ``"task"`` (``split_classes``
            without / with task labels), ``"permuted"``, ``"rotated"``, ``"online"``
            (a class-incremental base unless ``base=`` is passed).
        n_experiences: number of (base) experiences; None keeps the builder's
            default (5; 10 for permuted).
        seed: seed of the digits split, class order, permutations and subsamples.
        root: folder of the IDX files (see ``peer_ll.data.images``).
        **kwargs: passed to the builder, e.g. ``flatten``, ``max_train_per_exp``,
            ``angles``, ``experience_size``.

    Returns:
        The Avalanche benchmark.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"name must be one of {list(IMAGE_DATASETS)}; got {name!r}")
    if kind not in STREAM_KINDS:
        raise ValueError(f"kind must be one of {list(STREAM_KINDS)}; got {kind!r}")
    data = load_images(name, root=root, seed=seed)
    if n_experiences is not None:
        kwargs["n_experiences"] = n_experiences
    if kind in ("class", "task"):
        return split_classes(data, task_labels=kind == "task", seed=seed, **kwargs)
    builder = {"permuted": permuted, "rotated": rotated, "online": online}[kind]
    return builder(data, seed=seed, **kwargs)
