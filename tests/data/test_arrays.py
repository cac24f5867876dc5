"""A user's own data: arrays and tensors in ``make_stream``, and ``load_arrays`` on files."""

import numpy as np
import pytest
import torch

from peer_ll.data.arrays import load_arrays, user_splits
from peer_ll.data.streams import make_stream


def _data(n=120, features=3, classes=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)), np.arange(n) % classes


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.float64),
        lambda a: a.astype(np.float16),
        lambda a: (a * 10).astype(np.int16),
        lambda a: torch.tensor(a, dtype=torch.float64),
        lambda a: torch.tensor(a, dtype=torch.bfloat16),
    ],
    ids=["np-float64", "np-float16", "np-int16", "torch-float64", "torch-bfloat16"],
)
def test_any_real_dtype_becomes_float32(convert):
    x, y = _data()
    bench = make_stream((convert(x), torch.tensor(y)), kind="class", n_experiences=3)
    sample, _, task = bench.train_stream[0].dataset[0]
    assert sample.dtype == torch.float32 and sample.shape == (3,) and task == 0
    rows = torch.as_tensor(convert(x)).to(torch.float32)  # the values, cast to float32
    assert (rows == sample).all(1).any()


def test_values_are_kept_and_labels_renumbered():
    x, y = _data()
    splits = user_splits((x, y * 5 + 7), test_fraction=0.25, seed=3)
    assert splits.classes.tolist() == [7, 12, 17] and splits.n_classes == 3
    assert len(splits.train_labels) == 90 and len(splits.test_labels) == 30
    rows = {tuple(np.round(r, 5)) for r in x.astype(np.float32)}
    assert all(tuple(np.round(r, 5)) in rows for r in splits.train_images)  # no scaling
    i = int(np.flatnonzero((x.astype(np.float32) == splits.test_images[0]).all(1))[0])
    assert splits.test_labels[0] == y[i]  # label i*5+7 -> class id i
    bench = make_stream((x, y), kind="class", n_experiences=3, seed=3, test_fraction=0.25)
    got = torch.stack([bench.train_stream[e].dataset[0][0] for e in range(3)])
    assert torch.isin(got, torch.as_tensor(x, dtype=torch.float32)).all()


def test_given_test_set():
    x, y = _data()
    bench = make_stream((x[:90], y[:90]), kind="task", n_experiences=3, test=(x[90:], y[90:]))
    assert sum(len(e.dataset) for e in bench.test_stream) == 30
    assert sum(len(e.dataset) for e in bench.train_stream) == 90
    with pytest.raises(ValueError, match=r"test X must have samples of shape \(3,\) .*got \(2,\)"):
        make_stream((x, y), kind="class", test=(x[:, :2], y))
    with pytest.raises(ValueError, match=r"test y must hold only classes seen in data y"):
        make_stream((x, y), kind="class", test=(x, y + 1))
    with pytest.raises(ValueError, match="test must have task labels exactly when data has"):
        make_stream((x, y, y), kind="class", test=(x, y))


def test_rotated_needs_images_and_permuted_takes_features():
    x, y = _data()
    with pytest.raises(ValueError, match=r"rotated needs images \(N, H, W\), got .*\(3,\)"):
        make_stream((x, y), kind="rotated")
    bench = make_stream((x, y), kind="permuted", n_experiences=2, seed=1)
    a, b = (bench.train_stream[e].dataset[0][0] for e in range(2))
    assert sorted(a.tolist()) == sorted(b.tolist()) and not torch.equal(a, b)
    images = np.random.default_rng(0).random((60, 5, 5))
    bench = make_stream((images, np.arange(60) % 2), kind="rotated", angles=[0, 90])
    first, turned = (bench.train_stream[e].dataset[0][0].reshape(5, 5) for e in range(2))
    assert torch.allclose(torch.rot90(first, 1), turned, atol=1e-5)  # floats are not rounded


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([np.zeros((4, 2))], TypeError, r"data must be a tuple \(X, y\) .*got list of length 1"),
        ((np.zeros((4, 2)), [0, 1, 0, 1]), TypeError, "data y must be a numpy array"),
        ((np.zeros((4, 2), bool), np.zeros(4, int)), TypeError, "X must have a real .*got bool"),
        ((np.zeros(4), np.zeros(4, int)), ValueError, r"X must have shape \(N, features\)"),
        ((np.zeros((4, 2, 2, 2)), np.zeros(4, int)), ValueError, "or \\(N, H, W\\)"),
        ((np.zeros((4, 2)), np.zeros(4)), TypeError, "y must have an integer dtype, got float64"),
        ((np.zeros((4, 2)), np.zeros(3, int)), ValueError, r"y must have shape \(4,\) like X"),
        ((np.zeros((4, 2)), np.zeros(4, int), np.zeros(5, int)), ValueError,
         r"task_labels must have shape \(4,\)"),
        ((np.full((4, 2), np.nan), np.zeros(4, int)), ValueError, "X must be finite"),
        ((np.full((4, 2), 1e300), np.zeros(4, int)), ValueError, "finite in float32"),
        ((np.zeros((4, 2)), np.array([0, 0, 0, 1])), ValueError, "cannot be split .*pass test="),
    ],
)  # fmt: skip
def test_bad_arrays(data, error, match):
    with pytest.raises(error, match=match):
        make_stream(data, kind="class", n_experiences=1)


def test_task_labels_define_experiences():
    x, y = _data(n=180)
    tasks = np.repeat([5, 2, 9], 60)  # sorted: 2, 5, 9 -> experiences 0, 1, 2
    bench = make_stream((x, y, tasks), kind="task", seed=0)
    assert [e.task_label for e in bench.train_stream] == [0, 1, 2]
    first = bench.train_stream[0].dataset
    assert len(first) == 48 and set(first.targets_task_labels) == {0}
    with pytest.raises(ValueError, match="n_experiences must be None or the 3 task labels .*got 2"):
        make_stream((x, y, tasks), kind="task", n_experiences=2)
    with pytest.raises(ValueError, match="kind must be 'class', 'task' or 'online' .*'permuted'"):
        make_stream((x, y, tasks), kind="permuted")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_stream((x, y, tasks), kind=None)


def test_task_stream_renumbers_classes_per_task():
    x, y = _data(n=120, classes=4)
    tasks = (y >= 2).astype(np.int64)  # task 0: classes 0, 1; task 1: classes 2, 3
    bench = make_stream((x, y, tasks), kind="task")
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [[0, 1]] * 2
    bench = make_stream((x, y, tasks), kind="class")
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [[0, 1], [2, 3]]


def test_load_npz(tmp_path):
    x, y = _data()
    np.savez(tmp_path / "d.npz", X=x, y=y)
    got = load_arrays(tmp_path / "d.npz")
    assert len(got) == 2 and np.array_equal(got[0], x) and np.array_equal(got[1], y)
    np.savez(tmp_path / "t.npz", X=x, y=y, task=y % 2)
    assert np.array_equal(load_arrays(tmp_path / "t.npz")[2], y % 2)
    np.savez(tmp_path / "bad.npz", X=x, labels=y)
    with pytest.raises(ValueError, match=r"must hold arrays X and y, missing \['y'\]"):
        load_arrays(tmp_path / "bad.npz")


def test_load_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,task,kind\n1.5,2,0,cat\n3,4.25,1,dog\n5,6,1,cat\n")
    x, y, task = load_arrays(path)
    assert x.dtype == np.float32 and x.tolist() == [[1.5, 2.0], [3.0, 4.25], [5.0, 6.0]]
    assert y.tolist() == [0, 1, 0] and task.tolist() == [0, 1, 1]
    path.write_text("a,task,b\n1,0,7\n3,1,8\n2,1,9\n")
    x, y = load_arrays(path, label="a", task=None)  # the task column is then a feature
    assert y.tolist() == [1, 3, 2] and x.tolist() == [[0, 7], [1, 8], [1, 9]]
    x, y, task = load_arrays(path, label=0)
    assert x.tolist() == [[7], [8], [9]] and task.tolist() == [0, 1, 1]
    path.write_text("a,b,y\n1,2,10\n3,4,20\n")
    x, y = load_arrays(path)
    assert y.tolist() == [10, 20] and x.tolist() == [[1, 2], [3, 4]]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"path must end with .npz or .csv, got 'd.txt'"):
        load_arrays(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_arrays(tmp_path / "d.csv")
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n3,4\n")
    with pytest.raises(ValueError, match="row 3 has 2 columns, the header 3"):
        load_arrays(path)
    path.write_text("a,b,y\n1,x,0\n")
    with pytest.raises(ValueError, match="feature columns must be numeric"):
        load_arrays(path)
    with pytest.raises(ValueError, match=r"label must be a column of d.csv \['a', 'b', 'y'\]"):
        load_arrays(path, label="z")
    with pytest.raises(ValueError, match=r"label must be a column index in \[0, 3\), got 3"):
        load_arrays(path, label=3)


def test_split_is_stratified_by_task_and_class():
    x = np.random.default_rng(0).random((80, 3))
    y, tasks = np.repeat([-1, 0], 40), np.tile([0, 1], 40)  # negative labels are fine
    splits = user_splits((x, y, tasks), test_fraction=0.25)
    pairs, counts = np.unique(np.stack([splits.test_tasks, splits.test_labels]), axis=1,
                              return_counts=True)  # fmt: skip
    assert pairs.shape == (2, 4) and counts.tolist() == [5, 5, 5, 5]
    assert splits.classes.tolist() == [-1, 0]
