"""Tests for the Avalanche task streams built on digits and small synthetic images."""

import numpy as np
import pytest
import torch

from peer_ll.data import images
from peer_ll.data.idx import write_mnist_like
from peer_ll.data.images import ImageSplits, load_digits_splits
from peer_ll.data.streams import make_stream, online, permuted, rotated, split_classes


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits(seed=0)


def _classes(exp):
    return set(exp.dataset.targets)


def test_class_incremental_split(digits):
    bm = split_classes(digits, n_experiences=5, seed=0)
    train, test = list(bm.train_stream), list(bm.test_stream)
    assert len(train) == len(test) == 5
    seen = set()
    for tr, te in zip(train, test, strict=True):
        assert len(_classes(tr)) == 2 and _classes(tr) == _classes(te)
        assert not (seen & _classes(tr))  # disjoint classes
        seen |= _classes(tr)
        assert tr.task_label == 0 and set(tr.dataset.targets_task_labels) == {0}
    assert seen == set(range(10))  # original class ids kept
    assert sum(len(e.dataset) for e in train) == 1437
    x, y, t = train[0].dataset[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    assert x.max() > 0.5 and y in _classes(train[0]) and t == 0


def test_class_order_follows_seed(digits):
    def order(seed):
        return [sorted(_classes(e)) for e in split_classes(digits, seed=seed).train_stream]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_uneven_split_and_subsample(digits):
    bm = split_classes(digits, n_experiences=3, max_train_per_exp=40, max_test_per_exp=12)
    assert [len(_classes(e)) for e in bm.train_stream] == [4, 3, 3]
    assert [len(e.dataset) for e in bm.train_stream] == [40, 40, 40]
    assert [len(e.dataset) for e in bm.test_stream] == [12, 12, 12]
    counts = np.bincount(list(bm.train_stream[1].dataset.targets))
    assert sorted(counts[counts > 0]) == [13, 13, 14]  # balanced over the 3 classes


def test_task_incremental_split(digits):
    bm = split_classes(digits, n_experiences=5, task_labels=True, seed=0, flatten=False)
    for e, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        assert tr.task_label == te.task_label == e
        assert _classes(tr) == _classes(te) == {0, 1}  # class ids restart in each task
        x, y, t = te.dataset[0]
        assert t == e and y in (0, 1) and x.shape == (1, 8, 8)


def test_split_errors(digits):
    with pytest.raises(ValueError, match=r"n_experiences must be an int in \[1, 10\], got 11"):
        split_classes(digits, n_experiences=11)
    with pytest.raises(ValueError, match="at least the 2 classes"):
        split_classes(digits, max_train_per_exp=1)


def _position_images(n: int) -> np.ndarray:
    """Every image holds its pixel positions 0..63, so a permutation can be read off."""
    return np.tile(np.arange(64, dtype=np.uint8).reshape(8, 8), (n, 1, 1))


@pytest.fixture(scope="module")
def positions():
    labels = np.arange(40) % 4
    return ImageSplits(
        "positions", _position_images(40), labels, _position_images(20), labels[:20], max_value=63.0
    )


def _permutation_of(dataset) -> set:
    return {tuple(torch.round(dataset[i][0] * 63).long().tolist()) for i in range(len(dataset))}


@pytest.mark.parametrize("keep_first", [False, True])
def test_permuted_consistent_within_and_distinct_across(positions, keep_first):
    bm = permuted(positions, n_experiences=3, seed=0, keep_first=keep_first)
    perms = []
    for tr, te in zip(bm.train_stream, bm.test_stream, strict=True):
        seen = _permutation_of(tr.dataset) | _permutation_of(te.dataset)
        assert len(seen) == 1  # one permutation for all train and test images
        perm = seen.pop()
        assert sorted(perm) == list(range(64))
        perms.append(perm)
        assert _classes(tr) == _classes(te) == {0, 1, 2, 3}
    assert len(set(perms)) == 3
    assert (perms[0] == tuple(range(64))) == keep_first
    again = permuted(positions, n_experiences=3, seed=0, keep_first=keep_first)
    assert perms == [_permutation_of(e.dataset).pop() for e in again.train_stream]


def test_permuted_digits_keep_pixels(digits):
    bm = permuted(digits, n_experiences=2, max_train_per_exp=30, max_test_per_exp=10)
    assert [len(e.dataset) for e in bm.train_stream] == [30, 30]
    a, b = bm.train_stream[0].dataset[5], bm.train_stream[1].dataset[5]
    assert a[1] == b[1]  # the same image in both experiences, permuted differently
    assert torch.equal(torch.sort(a[0]).values, torch.sort(b[0]).values)
    assert not torch.equal(a[0], b[0])


def test_rotated_matches_rot90():
    img = np.zeros((8, 8), dtype=np.uint8)
    img[1, 1:7], img[1:7, 2] = 200, 100  # asymmetric
    data = ImageSplits(
        "r",
        np.stack([img] * 4),
        np.array([0, 1, 0, 1]),
        np.stack([img] * 2),
        np.array([0, 1]),
        max_value=255.0,
    )
    bm = rotated(data, angles=[0, 90, 180], flatten=False)
    for k, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        want = torch.from_numpy(np.rot90(img, k).copy()).float() / 255.0  # counter-clockwise
        assert torch.allclose(tr.dataset[0][0][0], want)
        assert torch.allclose(te.dataset[1][0][0], want)
    assert len(list(rotated(data, n_experiences=4).train_stream)) == 4
    with pytest.raises(ValueError, match=r"n_experiences must equal len\(angles\) = 2"):
        rotated(data, angles=[0, 45], n_experiences=3)


def test_online_stream(digits):
    bm = online(digits, n_experiences=2, experience_size=16, max_train_per_exp=40, seed=0)
    exps = list(bm.train_stream)
    base = list(bm.original_train_stream)
    assert len(base) == 2 and len(list(bm.test_stream)) == 2
    assert [len(e.dataset) for e in exps] == [16, 16, 8, 16, 16, 8]
    assert [e.current_experience for e in exps] == list(range(6))
    assert list(bm.train_stream)[3] is exps[3]  # the lazy stream is memoised
    with exps[2].no_attribute_masking():
        assert exps[2].is_last_subexp and not exps[3].is_last_subexp
        assert exps[2].origin_experience.current_experience == 0
        assert exps[3].origin_experience.current_experience == 1
    labels = [y for e in exps[:3] for y in e.dataset.targets]
    assert sorted(labels) == sorted(base[0].dataset.targets)  # one pass, nothing repeated
    task = online(digits, base="task", n_experiences=2, experience_size=500)
    assert [e.dataset[0][2] for e in task.train_stream] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="base must be one of"):
        online(digits, base="iid")


def test_make_stream(monkeypatch, tmp_path):
    bm = make_stream("digits", kind="task", n_experiences=2, max_train_per_exp=20)
    assert [e.task_label for e in bm.train_stream] == [0, 1]
    with pytest.raises(ValueError, match=r"data must be a name in \['digits', 'fashion-mnist'"):
        make_stream("cifar", kind="class")
    with pytest.raises(ValueError, match="test must be None for data of type str"):
        make_stream("digits", kind="class", test=(np.zeros((2, 2)), np.zeros(2, int)))
    with pytest.raises(ValueError, match="root must be None for data of type tuple"):
        make_stream((np.zeros((20, 2)), np.arange(20) % 2), kind="class", root=tmp_path)
    with pytest.raises(ValueError, match=r"kind must be one of \('class', 'task', 'permuted'"):
        make_stream("digits", kind="iid")
    # a fake Fashion-MNIST found through the environment variable
    rng = np.random.default_rng(0)
    labels = np.arange(20) % 10
    write_mnist_like(
        tmp_path / "fashion-mnist",
        rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        labels,
        rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        labels[:10],
    )
    monkeypatch.setenv(images.ENV_VAR, str(tmp_path))
    bm = make_stream("fashion-mnist", kind="permuted", n_experiences=2)
    x, y, _ = bm.test_stream[1].dataset[0]
    assert x.shape == (784,) and len(bm.train_stream[0].dataset) == 20
