"""``n_classes`` is right on every stream kind and every data source."""

import numpy as np
import pytest
import torch

from peer_ll.data import images
from peer_ll.data.benchmarks import class_count
from peer_ll.data.idx import write_mnist_like
from peer_ll.data.images import ImageDataset
from peer_ll.data.streams import make_stream

SMALL = {"max_train_per_exp": 30, "max_test_per_exp": 20}
KINDS = ["class", "task", "permuted", "rotated", "online"]


def _labels_of(bench):
    """Every label in the train and test streams (online: its train stream)."""
    out = set()
    for exp in [*bench.train_stream, *bench.test_stream]:
        out |= {int(y) for y in exp.dataset.targets}
    return out


def _check(bench, want: int, kind: str):
    assert bench.n_classes == want
    labels = _labels_of(bench)
    if kind == "task":  # class ids from zero in each experience; n_classes counts the data's
        assert max(labels) < want
    else:  # a head of n_classes outputs covers every label, and every output is used
        assert labels == set(range(want))


@pytest.mark.parametrize("kind", KINDS)
def test_digits(kind):
    _check(make_stream("digits", kind=kind, n_experiences=3, **SMALL), 10, kind)


def test_permuted_is_not_experiences_times_classes():
    bench = make_stream("digits", kind="permuted", n_experiences=3, **SMALL)
    assert bench.n_classes == 10 and bench.n_classes != 3 * 10


@pytest.mark.parametrize("kind", ["class", "permuted", "rotated"])
def test_idx_files(kind, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 6
    write_mnist_like(
        tmp_path / "fashion-mnist",
        rng.integers(0, 256, (24, 8, 8), dtype=np.uint8),
        labels,
        rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        labels[:12],
    )
    monkeypatch.setenv(images.ENV_VAR, str(tmp_path))
    _check(make_stream("fashion-mnist", kind=kind, n_experiences=2), 6, kind)


def _arrays(n=240, classes=4, shape=(5,), tasks=None):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, *shape))
    y = 10 + 3 * (np.arange(n) % classes)  # labels 10, 13, ...: renumbered 0..C-1
    return (x, y) if tasks is None else (x, y, np.arange(n) // (n // tasks))


@pytest.mark.parametrize("kind", KINDS)
def test_arrays(kind):
    data = _arrays(shape=(4, 4))  # images, so that rotated applies
    _check(make_stream(data, kind=kind, n_experiences=2), 4, kind)


@pytest.mark.parametrize("kind", ["class", "task", "online"])
def test_arrays_with_task_labels(kind):
    bench = make_stream(_arrays(tasks=3), kind=kind)
    _check(bench, 4, kind)
    if kind != "online":
        want = [0, 1, 2] if kind == "task" else [0, 0, 0]
        assert [e.task_label for e in bench.train_stream] == want


def _tiny(labels, offset=0):
    rng = np.random.default_rng(offset)
    labels = np.asarray(labels)
    return ImageDataset(rng.integers(0, 9, (len(labels), 2, 2)), labels, 8.0, True)


def test_avalanche_domain_benchmark_is_corrected():
    """Avalanche's PermutedMNIST recipe: one dataset per experience, ids from zero in each."""
    from avalanche.benchmarks import nc_benchmark

    sets = [_tiny(np.arange(12) % 3, e) for e in range(4)]
    bench = nc_benchmark(
        sets, sets, 4, task_labels=False, shuffle=False,
        one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True,
    )  # fmt: skip
    assert bench.n_classes == 12  # Avalanche's count: experiences x classes
    assert make_stream(bench) is bench and bench.n_classes == 3
    online = make_stream(bench, kind="online", experience_size=5)
    assert online.n_classes == 3 and len(list(online.train_stream)) == 4 * 3


def test_avalanche_benchmarks_kept_or_set():
    from avalanche.benchmarks import benchmark_from_datasets, nc_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    data = _tiny(np.arange(30) % 6)
    split = nc_benchmark(data, data, 3, task_labels=False, seed=0)
    assert make_stream(split).n_classes == 6
    task_split = nc_benchmark(data, data, 3, task_labels=True, seed=0,
                              class_ids_from_zero_in_each_exp=True)  # fmt: skip
    assert make_stream(task_split).n_classes == 6  # task-labelled: Avalanche's count kept
    parts = [as_classification_dataset(_tiny(np.arange(8) % k)) for k in (2, 5)]
    generic = benchmark_from_datasets(train=parts, test=parts)
    assert not hasattr(generic, "n_classes")
    assert make_stream(generic).n_classes == class_count(generic) == 5


def test_benchmark_arguments_are_checked():
    from avalanche.benchmarks import nc_benchmark

    data = _tiny(np.arange(30) % 6)
    bench = nc_benchmark(data, data, 3, task_labels=False, seed=0)
    with pytest.raises(ValueError, match="kind must be None or 'online' .*got 'permuted'"):
        make_stream(bench, kind="permuted")
    with pytest.raises(ValueError, match="n_experiences must be None .*got 2"):
        make_stream(bench, n_experiences=2)
    with pytest.raises(ValueError, match=r"takes no builder arguments, got \['flatten'\]"):
        make_stream(bench, flatten=False)
    with pytest.raises(TypeError, match="bench must be an Avalanche benchmark, got int"):
        class_count(3)
    with pytest.raises(TypeError, match="data must be a dataset name, a tuple .* got dict"):
        make_stream({"X": torch.zeros(2)}, kind="class")
