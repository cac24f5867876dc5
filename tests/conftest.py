"""Shared test set-up.

TRITON_INTERPRET must be set before anything is decorated with ``@triton.jit``, so it
is set here, at collection, before any peer_ll kernel module is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

# pytest -n 2 runs two workers on two cores: one intra-op thread each avoids
# oversubscribing the CPU, which made the suite several times slower.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it (CLI runs set their own count);
    tiny models on a loaded 2-core machine otherwise spin OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small Avalanche streams on scikit-learn's bundled digits, and a small PEER config
# (strategies and protect tests).
# Tiny pools so that whole strategies run in seconds: 16 experts per segment.
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
    """Task-incremental: as ``class_stream``, task label = experience, classes 0..2."""
    return _stream(task_labels=True)


@pytest.fixture(scope="session")
def domain_stream():
    """Domain-incremental: 2 experiences with the same 4 classes (random halves)."""
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    x, y = _digits(4)
    halves = [slice(0, 100), slice(100, 200)]
    train = [tensor_dataset(x[h], y[h]) for h in halves]
    test = [tensor_dataset(x[200:260], y[200:260])] * 2
    return with_classes_timeline(benchmark_from_datasets(train=train, test=test))


@pytest.fixture
def small_peer():
    return dict(SMALL_PEER)
