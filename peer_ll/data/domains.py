"""Domain-incremental streams: the same classes in every experience, a new input domain.

``permuted`` applies one fixed pixel (or feature) permutation per experience, ``rotated``
one rotation angle per experience (images only). Both return Avalanche benchmarks whose
``n_classes`` is the number of classes of the data, not experiences x classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from peer_ll.data.images import ImageDataset, ImageSplits, balanced_indices
from peer_ll.experts.checks import check_int

__all__ = ["permuted", "rotated"]


def train_test_datasets(
    data: ImageSplits, flatten: bool, train_idx=slice(None), test_idx=slice(None)
):
    """(train, test) torch datasets over the given indices of ``data``."""
    return (
        ImageDataset(
            data.train_images[train_idx], data.train_labels[train_idx], data.max_value, flatten
        ),
        ImageDataset(
            data.test_images[test_idx], data.test_labels[test_idx], data.max_value, flatten
        ),
    )


def _domain_benchmark(pairs: list, *, task_labels: bool, n_classes: int):
    """One experience per (train, test) dataset pair; every experience has all classes.

    ``nc_benchmark(one_dataset_per_exp=True)`` counts experiences x classes, since it
    offsets each dataset's classes before remapping them from zero; the stream's labels
    take ``n_classes`` values, so that is what the benchmark reports.
    """
    from avalanche.benchmarks import nc_benchmark

    trains, tests = zip(*pairs, strict=True)
    bench = nc_benchmark(
        list(trains),
        list(tests),
        len(pairs),
        task_labels=task_labels,
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )
    bench.n_classes = n_classes
    return bench


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

    check_int("n_experiences", n_experiences, minimum=1)
    data = _subsampled(dataset, seed, max_train_per_exp, max_test_per_exp)
    rng = np.random.default_rng(seed)
    n_pixels = int(np.prod(dataset.image_shape))
    pairs = []
    for e in range(n_experiences):
        perm = None if (keep_first and e == 0) else torch.from_numpy(rng.permutation(n_pixels))
        pair = [as_classification_dataset(d) for d in train_test_datasets(data, flatten)]
        if perm is not None:  # a frozen transform: applied in train and eval, as PermutedMNIST
            groups = DefaultTransformGroups((PixelsPermutation(perm), None))
            pair = [make_avalanche_dataset(d, frozen_transform_groups=groups) for d in pair]
        pairs.append(pair)
    return _domain_benchmark(pairs, task_labels=task_labels, n_classes=dataset.n_classes)


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

    if len(dataset.image_shape) != 2:
        raise ValueError(
            f"rotated needs images (N, H, W), got samples of shape {dataset.image_shape}"
        )
    if angles is None:
        n = 5 if n_experiences is None else check_int("n_experiences", n_experiences, minimum=1)
        angles = [180.0 * e / n for e in range(n)]
    if len(angles) == 0:
        raise ValueError("angles must hold at least one angle, got an empty sequence")
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
        pairs.append([as_classification_dataset(d) for d in train_test_datasets(turned, flatten)])
    return _domain_benchmark(pairs, task_labels=task_labels, n_classes=dataset.n_classes)


def _rotate(images: np.ndarray, angle: float, max_value: float) -> np.ndarray:
    """Rotates (N, H, W) images counter-clockwise by ``angle`` degrees.

    Integer pixels are rounded back and clamped to [0, max_value]; float ones are kept.
    """
    from torchvision.transforms.functional import InterpolationMode, rotate

    if angle % 360 == 0:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(torch.float32)
    x = rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    if np.issubdtype(images.dtype, np.floating):
        return x.squeeze(1).numpy().astype(images.dtype)
    return x.round_().clamp_(0, max_value).squeeze(1).numpy().astype(images.dtype)
