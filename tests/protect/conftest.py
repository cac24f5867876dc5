"""A small class-incremental stream on scikit-learn's bundled digits, a small PEER config."""

import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

# Tiny pools so that protection strategies run in seconds: 16 experts per segment.
SMALL_PEER = dict(num_keys=4, heads=2, topk=4, dim_key=16)


def _digits(classes: int):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target)
    keep = y < classes
    return x[keep], y[keep]


def _stream(*, task_labels: bool, experiences: int = 3, classes: int = 9, train: int = 270):
    from avalanche.benchmarks import nc_benchmark

    x, y = _digits(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nc_benchmark(
            TensorDataset(x[:train], y[:train]),
            TensorDataset(x[train : train + 135], y[train : train + 135]),
            experiences,
            task_labels=task_labels,
            seed=0,
            class_ids_from_zero_in_each_exp=task_labels,
        )


@pytest.fixture(scope="session")
def class_stream():
    """Class-incremental: 3 experiences of 3 digit classes, ~90 training samples each."""
    return _stream(task_labels=False)


@pytest.fixture(scope="session")
def task_stream():
    """Task-incremental: the same 3 experiences with task labels, classes 0..2 in each."""
    return _stream(task_labels=True)


@pytest.fixture
def small_peer():
    return dict(SMALL_PEER)
