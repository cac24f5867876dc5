"""A user's own data: arrays or tensors ``(X, y[, task])``, and files that hold them.

``make_stream((X, y), kind=...)`` builds the usual streams on such arrays (see
``peer_ll.data.streams``); ``load_arrays(path)`` reads them from a ``.npz`` or
``.csv`` file. Conventions:

- X: (N, F) features, or (N, H, W) images (needed for ``kind="rotated"``); any real
  dtype (numpy or torch, float16/32/64, bfloat16, integers), cast to float32 and used
  as given (no scaling). It must be finite.
- y: (N,) integer class labels, any values; they are renumbered 0..C-1 in sorted order.
- task: (N,) optional integer task labels. When given, they define the experiences:
  one per distinct value, in sorted order (see ``make_stream``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peer_ll.data.images import ImageSplits

__all__ = ["UserSplits", "load_arrays", "user_splits"]


@dataclass(frozen=True)
class UserSplits(ImageSplits):
    """``ImageSplits`` of float32 arrays (``max_value`` 1: no scaling), with task labels.

    Attributes (besides those of ``ImageSplits``):
        train_tasks: (N_train,) int64 task label of each sample, or None.
        test_tasks: (N_test,) int64, or None.
        classes: (C,) the original label of each class id 0..C-1.
    """

    train_tasks: np.ndarray | None = None
    test_tasks: np.ndarray | None = None
    classes: np.ndarray | None = None


def _as_numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.to(torch.float32)  # bfloat16 has no numpy dtype
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")


def _check_arrays(data: object, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (X float32, y int64, task int64 or None) from a tuple ``data``."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        length = f" of length {len(data)}" if isinstance(data, (tuple, list)) else ""
        raise TypeError(
            f"{what} must be a tuple (X, y) or (X, y, task_labels), got "
            f"{type(data).__name__}{length}"
        )
    x = _as_numpy(f"{what} X", data[0])
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{what} X must have a real (float or integer) dtype, got {x.dtype}")
    if x.ndim not in (2, 3) or len(x) == 0:
        raise ValueError(
            f"{what} X must have shape (N, features) or (N, H, W) with N > 0, got {x.shape}"
        )
    with np.errstate(over="ignore"):  # values past float32's range are caught just below
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} X must be finite in float32, got NaN or infinite values")
    out = [x]
    for name, value in zip(("y", "task_labels"), data[1:], strict=False):
        a = _as_numpy(f"{what} {name}", value)
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} {name} must have an integer dtype, got {a.dtype}")
        if a.shape != (len(x),):
            raise ValueError(f"{what} {name} must have shape ({len(x)},) like X, got {a.shape}")
        out.append(a.astype(np.int64))
    return out[0], out[1], out[2] if len(out) == 3 else None


def user_splits(
    data: tuple, *, test: tuple | None = None, test_fraction: float = 0.2, seed: int = 0
) -> UserSplits:
    """Checks a user's arrays and splits them into train and test.

    Args:
        data: ``(X, y)`` or ``(X, y, task_labels)`` (see the module docstring).
        test: the same for a given test set; None splits ``data`` instead,
            stratified by class (and task), with ``test_fraction`` of it for test.
        test_fraction: share of ``data`` held out for test when ``test`` is None.
        seed: seed of that split.

    Returns:
        ``UserSplits`` with labels renumbered 0..C-1 over train and test together.

    Raises:
        TypeError: a non-tuple, a non-array, a non-real X, non-integer labels.
        ValueError: bad shapes or lengths, non-finite X, task labels on one side only,
            test classes absent from training, a split that leaves a class out.
    """
    x, y, task = _check_arrays(data, "data")
    if test is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        from sklearn.model_selection import train_test_split

        groups = (
            y if task is None else np.unique(np.stack([task, y]), axis=1, return_inverse=True)[1]
        )
        arrays = (x, y) if task is None else (x, y, task)
        try:
            parts = train_test_split(
                *arrays, test_size=test_fraction, random_state=seed, stratify=groups
            )
        except ValueError as err:
            raise ValueError(
                f"data cannot be split with test_fraction={test_fraction} keeping every class "
                f"(and task) in both parts: {err}; pass test= or more samples"
            ) from err
        train, test_arrays = parts[0::2], parts[1::2]
        train = (*train, None) if task is None else tuple(train)
        test_arrays = (*test_arrays, None) if task is None else tuple(test_arrays)
    else:
        train = (x, y, task)
        test_arrays = _check_arrays(test, "test")
        if test_arrays[0].shape[1:] != x.shape[1:]:
            raise ValueError(
                f"test X must have samples of shape {x.shape[1:]} like data X, "
                f"got {test_arrays[0].shape[1:]}"
            )
        if (task is None) != (test_arrays[2] is None):
            raise ValueError("test must have task labels exactly when data has them")
    classes = np.unique(train[1])
    unseen = np.setdiff1d(test_arrays[1], classes)
    if len(unseen):
        raise ValueError(f"test y must hold only classes seen in data y, got also {unseen[:5]}")
    return UserSplits(
        "arrays", train[0], np.searchsorted(classes, train[1]),
        test_arrays[0], np.searchsorted(classes, test_arrays[1]), max_value=1.0,
        train_tasks=train[2], test_tasks=test_arrays[2], classes=classes,
    )  # fmt: skip


def load_arrays(
    path: str | Path, *, label: str | int | None = None, task: str | None = "task"
) -> tuple[np.ndarray, ...]:
    """Reads a user's data file into ``(X, y)`` or ``(X, y, task_labels)`` for ``make_stream``.

    Args:
        path: a ``.npz`` file with arrays ``X`` (N, ...) and ``y`` (N,), and
            optionally ``task`` (N,); or a ``.csv`` file with a header row and
            one sample per row, all columns numeric except possibly the label.
        label: CSV only: the label column, by header name or index; None is the
            last column. Labels that are not integers (e.g. ``"cat"``) are
            numbered 0..C-1 in sorted order.
        task: CSV only: the name of the task-label column, used when the header
            has it (None: never). For ``.npz`` the key is always ``task``.

    Returns:
        ``(X, y)`` or ``(X, y, task_labels)``: X float32 (N, F) for CSV, as stored
        for ``.npz``; labels int64 (N,).

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, missing keys or columns, non-numeric features,
            ragged rows.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".csv"):
        raise ValueError(f"path must end with .npz or .csv, got {path.name!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: must hold arrays X and y, missing {sorted(missing)}")
            return (f["X"], f["y"], f["task"]) if "task" in f.files else (f["X"], f["y"])
    return _read_csv(path, label, task)


def _read_csv(path: Path, label: str | int | None, task: str | None) -> tuple[np.ndarray, ...]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one sample row")
    header, body = rows[0], [r for r in rows[1:] if r]
    ragged = next((i for i, r in enumerate(body, 2) if len(r) != len(header)), None)
    if ragged is not None:
        raise ValueError(
            f"{path}: row {ragged} has {len(body[ragged - 2])} columns, the header {len(header)}"
        )
    if label is None:
        label_col = len(header) - 1
    elif isinstance(label, int):
        if not -len(header) <= label < len(header):
            raise ValueError(f"label must be a column index in [0, {len(header)}), got {label}")
        label_col = label % len(header)
    elif label in header:
        label_col = header.index(label)
    else:
        raise ValueError(f"label must be a column of {path.name} {header}, got {label!r}")
    task_col = header.index(task) if task is not None and task in header else None
    if task_col == label_col:
        raise ValueError(f"label and task must be different columns, both are {task!r}")
    cols = np.array(body, dtype=object).T
    labels = _integer_labels(cols[label_col])
    features = [c for c in range(len(header)) if c not in (label_col, task_col)]
    if not features:
        raise ValueError(f"{path}: has no feature column besides the label and task")
    try:
        x = cols[features].astype(np.float32).T
    except ValueError as err:
        raise ValueError(f"{path}: feature columns must be numeric ({err})") from err
    if task_col is None:
        return x, labels
    try:
        tasks = cols[task_col].astype(np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: column {task!r} must hold integers ({err})") from err
    return x, labels, tasks


def _integer_labels(column: np.ndarray) -> np.ndarray:
    """Integer labels as they are; other labels numbered in sorted order."""
    try:
        return column.astype(np.int64)
    except ValueError:
        return np.unique(column.astype(str), return_inverse=True)[1].astype(np.int64)
