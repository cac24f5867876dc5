"""Image classification data from local files: digits, Fashion-MNIST, MNIST.

Nothing is downloaded. scikit-learn's digits ship with scikit-learn. The IDX
files of Fashion-MNIST and MNIST are searched for, in this order:

1. the explicit ``root=`` argument (then only there);
2. ``$PEER_LL_DATA/<slug>`` and ``$PEER_LL_DATA`` (slug: ``fashion-mnist`` or ``mnist``);
3. ``/usr/share/datasets/fashion-mnist``, where the Debian package
   ``dataset-fashion-mnist`` installs Fashion-MNIST (there is none for MNIST);
4. ``~/.cache/peer_ll/<slug>``, then torchvision's and Avalanche's layouts:
   ``./data/<TvName>/raw`` and ``~/.avalanche/data/<avalanche-name>/<TvName>/raw``.

In every folder, ``raw/`` and ``<TvName>/raw/`` below it are tried too
(``TvName`` is ``FashionMNIST`` or ``MNIST``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peer_ll.data.idx import find_mnist_like_files, load_mnist_like

__all__ = [
    "IMAGE_DATASETS",
    "TORCHVISION_NAMES",
    "ImageDataset",
    "ImageSplits",
    "balanced_indices",
    "find_image_dataset",
    "image_search_paths",
    "load_digits_splits",
    "load_images",
]

IMAGE_DATASETS = ("digits", "fashion-mnist", "mnist")
ENV_VAR = "PEER_LL_DATA"
DEBIAN_DIR = Path("/usr/share/datasets")  # the Debian package's install root
TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_AVALANCHE_NAME = {"fashion-mnist": "fashionmnist", "mnist": "mnist"}
_DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist"}


@dataclass(frozen=True)
class ImageSplits:
    """Train and test images of one dataset, as stored (not yet scaled).

    Attributes:
        name: dataset name, e.g. ``"digits"``.
        train_images: (N_train, H, W) integer pixels in [0, max_value]; for a user's
            arrays (``peer_ll.data.arrays``), float32 (N_train, F) or (N_train, H, W).
        train_labels: (N_train,) int64 class ids in [0, n_classes).
        test_images: (N_test, H, W), like ``train_images``.
        test_labels: (N_test,) int64.
        max_value: the largest possible pixel value: 255 for IDX files, 16 for digits,
            1 (no scaling) for a user's arrays.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    max_value: float

    @property
    def n_classes(self) -> int:
        """Number of classes: 1 + the largest label in either split."""
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W) of one image; (F,) for a user's feature arrays."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


class ImageDataset(torch.utils.data.Dataset):
    """A torch dataset of integer images, scaled to float32 in [0, 1] on access.

    Float features (``max_value`` 1, as for a user's arrays) are used as they are.
    Items are ``(x, y)``: x of shape (H*W,) when ``flatten`` else (1, H, W);
    y an int. ``targets`` (list of int) is what Avalanche reads for labels.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, max_value: float, flatten: bool):
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # (N, H, W) integers
        self.targets = labels.tolist()
        self.scale = 1.0 / max_value
        self.shape = (-1,) if flatten else (1, *images.shape[1:])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32)  # float32 data: a view, so never scale in place
        if self.scale != 1.0:
            x = x * self.scale
        return x.reshape(self.shape), self.targets[i]


def balanced_indices(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``limit`` samples, spread evenly over classes.

    Classes get ``limit // C`` or one more sample each (fewer if a class is
    small); which samples is drawn from ``rng``. ``limit=None`` keeps all.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    n_classes = len(np.unique(labels))
    if limit < n_classes:
        raise ValueError(
            f"max_train_per_exp / max_test_per_exp must be at least the {n_classes} classes "
            f"of an experience, so that each keeps every class, got {limit}"
        )
    perm = rng.permutation(len(labels))
    shuffled = labels[perm]
    order = np.argsort(shuffled, kind="stable")
    starts = np.searchsorted(shuffled[order], shuffled[order])  # first slot of each class
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts  # rank of each sample within its class
    return np.sort(perm[np.argsort(rank, kind="stable")[:limit]])


def load_digits_splits(*, seed: int = 0, test_fraction: float = 0.2) -> ImageSplits:
    """scikit-learn's bundled digits: 1797 images of 8 x 8 pixels in [0, 16], 10 classes.

    Args:
        seed: seed of the split; the same seed gives the same split.
        test_fraction: share of each class put in the test split (stratified).

    Returns:
        ``ImageSplits`` with 1437 train and 360 test images at the default 0.2.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # integer pixels 0..16, stored as float
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return ImageSplits("digits", tr_x, tr_y, te_x, te_y, max_value=16.0)


def image_search_paths(name: str, root: str | Path | None = None) -> list[Path]:
    """The folders searched for ``name``'s IDX files, in order (see module docstring)."""
    _check_idx_name(name)
    if root is not None:
        return [Path(root).expanduser()]
    paths = []
    env = os.environ.get(ENV_VAR)
    if env:
        paths += [Path(env).expanduser() / name, Path(env).expanduser()]
    if name in _DEBIAN_PACKAGE:
        paths.append(DEBIAN_DIR / name)
    home = Path.home()
    paths += [
        home / ".cache" / "peer_ll" / name,
        Path.cwd() / "data",
        home / ".avalanche" / "data" / _AVALANCHE_NAME[name],
    ]
    return paths


def find_image_dataset(name: str, root: str | Path | None = None) -> Path | None:
    """Returns the folder holding ``name``'s four IDX files, or None."""
    tv_name = TORCHVISION_NAMES[_check_idx_name(name)]
    for folder in image_search_paths(name, root):
        files = find_mnist_like_files(folder, tv_name)
        if files is not None:
            return files["train_images"].parent
    return None


def load_images(name: str, *, root: str | Path | None = None, seed: int = 0) -> ImageSplits:
    """Loads one of ``IMAGE_DATASETS`` from local files.

    Args:
        name: ``"digits"``, ``"fashion-mnist"`` or ``"mnist"``.
        root: folder with the IDX files; when None, the search order of the
            module docstring applies. Ignored for digits.
        seed: seed of the digits train/test split (IDX datasets come split).

    Returns:
        ``ImageSplits``; for the IDX datasets 60000 + 10000 images of 28 x 28.

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: the IDX files were not found; the message lists
            where it looked and how to get them.
    """
    if name == "digits":
        return load_digits_splits(seed=seed)
    folder = find_image_dataset(name, root)
    if folder is None:
        raise FileNotFoundError(_not_found_message(name, root))
    tr_x, tr_y, te_x, te_y = load_mnist_like(folder)
    return ImageSplits(name, tr_x, tr_y, te_x, te_y, max_value=255.0)


def _check_idx_name(name: str) -> str:
    if name not in TORCHVISION_NAMES:
        raise ValueError(
            f"name must be one of {sorted(TORCHVISION_NAMES)} for IDX files, got {name!r}"
        )
    return name


def _not_found_message(name: str, root: str | Path | None) -> str:
    looked = "\n".join(f"  {p}" for p in image_search_paths(name, root))
    return (
        f"{name} IDX files (train/t10k images/labels) not found. Looked in:\n{looked}\n"
        f"(and in raw/ and {TORCHVISION_NAMES[name]}/raw/ below each).\n"
        f"Run `peer-ll data fetch {name}` for how to get them, or put the four files "
        f"in a folder and pass root= or set {ENV_VAR}."
    )
