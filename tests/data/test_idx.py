"""Tests for the IDX reader (torchvision's, wrapped) on files that the tests write themselves."""

import gzip
import struct

import numpy as np
import pytest

from peer_ll.data.idx import (
    find_mnist_like_files,
    load_mnist_like,
    read_idx,
    write_idx,
    write_mnist_like,
)


def _by_hand(shape, data: bytes, code: int = 0x08) -> bytes:
    """An IDX file spelled out: 0x0000, dtype code, ndim, big-endian sizes, data."""
    return struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + data


@pytest.mark.parametrize("gz", [False, True])
def test_read_hand_written_uint8(tmp_path, gz):
    payload = _by_hand((2, 3, 2), bytes(range(12)))
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    a = read_idx(path)
    assert a.dtype == np.uint8 and a.shape == (2, 3, 2)
    np.testing.assert_array_equal(a, np.arange(12).reshape(2, 3, 2))


def test_read_big_endian_int32(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_by_hand((3,), struct.pack(">3i", 1, -2, 70000), code=0x0C))
    a = read_idx(path)
    assert a.dtype == np.dtype("int32") and a.dtype.isnative
    assert a.tolist() == [1, -2, 70000]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_write_read_roundtrip(tmp_path, dtype, name):
    a = (np.arange(60).reshape(3, 4, 5) % 100).astype(dtype)
    b = read_idx(write_idx(tmp_path / name, a))
    assert b.dtype == a.dtype
    np.testing.assert_array_equal(a, b)


def test_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"bad.*bad IDX magic number 0x12340801"):
        read_idx(path)
    path.write_bytes(_by_hand((1,), b"\x00", code=0x07))  # unknown dtype code
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(path)
    path.write_bytes(_by_hand((1, 1, 1, 1), b"\x00"))  # 4 dimensions: torchvision reads 1 to 3
    with pytest.raises(ValueError, match="then 1 to 3 dimensions"):
        read_idx(path)


def test_truncated_files(tmp_path):
    path = tmp_path / "t"
    for data in (bytes(7), bytes(9)):  # one byte short, one byte over
        path.write_bytes(_by_hand((2, 4), data))
        with pytest.raises(ValueError, match=r"t: IDX data does not match .*truncated or corrupt"):
            read_idx(path)
    path.write_bytes(_by_hand((2, 4), bytes(8), code=0x0C)[:-1])  # int32: not whole elements
    with pytest.raises(ValueError, match="does not match its header"):
        read_idx(path)
    path.write_bytes(_by_hand((2, 4), bytes(8))[:7])  # the header itself is cut
    with pytest.raises(ValueError, match="does not match its header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(path)
    path.write_bytes(gzip.compress(_by_hand((100,), bytes(100)))[:-12])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


def test_write_idx_errors(tmp_path):
    with pytest.raises(TypeError, match=r"array must have an IDX dtype .*got int64"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="array must have 1 to 3 dimensions, got 4"):
        write_idx(tmp_path / "a", np.zeros((1, 1, 1, 1), dtype=np.uint8))
    assert not (tmp_path / "a").exists()


def test_the_reader_is_torchvisions(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    calls = []
    real = tv_mnist.read_sn3_pascalvincent_tensor

    def spy(path, strict=True):
        calls.append(path)
        return real(path, strict)

    monkeypatch.setattr(tv_mnist, "read_sn3_pascalvincent_tensor", spy)
    a = read_idx(write_idx(tmp_path / "s.gz", np.arange(6, dtype=np.uint8)))
    assert a.tolist() == list(range(6)) and len(calls) == 1
    assert calls[0].endswith("s") and not (tmp_path / "s").exists()  # gunzipped to a temp copy


def _fake_splits(rng, n_train=12, n_test=5, hw=(28, 28)):
    return (
        rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        rng.integers(0, 10, n_test),
    )


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_like_roundtrip(tmp_path, gz):
    arrays = _fake_splits(np.random.default_rng(0))
    write_mnist_like(tmp_path, *arrays, gz=gz)
    loaded = load_mnist_like(tmp_path)
    for want, got in zip(arrays, loaded, strict=True):
        np.testing.assert_array_equal(want, got)
    assert loaded[0].dtype == np.uint8 and loaded[1].dtype == np.int64
    assert loaded[0].shape == (12, 28, 28) and loaded[3].shape == (5,)


def test_dot_naming_and_torchvision_layout(tmp_path):
    arrays = _fake_splits(np.random.default_rng(1), hw=(4, 4))
    raw = write_mnist_like(tmp_path / "FashionMNIST" / "raw", *arrays, gz=False)
    for f in raw.iterdir():  # train-images-idx3-ubyte -> train-images.idx3-ubyte
        f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    assert find_mnist_like_files(tmp_path) is None  # needs the torchvision name
    files = find_mnist_like_files(tmp_path, "FashionMNIST")
    assert files["test_labels"] == raw / "t10k-labels.idx1-ubyte"
    np.testing.assert_array_equal(load_mnist_like(tmp_path, "FashionMNIST")[2], arrays[2])


def test_load_mnist_like_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train/t10k images/labels IDX files"):
        load_mnist_like(tmp_path)
    tr_x, tr_y, te_x, te_y = _fake_splits(np.random.default_rng(2))
    write_mnist_like(tmp_path, tr_x, tr_y[:-1], te_x, te_y)
    with pytest.raises(ValueError, match=r"expected 12 labels \(N,\), got shape \(11,\)"):
        load_mnist_like(tmp_path)
    with pytest.raises(ValueError, match="train_labels must be 1-D"):
        write_mnist_like(tmp_path, tr_x, tr_y + 300, te_x, te_y)
