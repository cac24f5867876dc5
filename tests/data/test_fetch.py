"""Tests for dataset discovery and ``peer-ll data fetch``; nothing real is installed."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from peer_ll.data import fetch as fetch_mod
from peer_ll.data import images
from peer_ll.data.idx import write_mnist_like


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """Hides every real dataset location: env var, Debian dir, home and cwd."""
    monkeypatch.delenv(images.ENV_VAR, raising=False)
    monkeypatch.setattr(images, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_fake(folder: Path, n_train: int = 6) -> Path:
    rng = np.random.default_rng(0)
    return write_mnist_like(
        folder,
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        np.arange(3),
    )


@pytest.mark.parametrize("sub", ["fashion-mnist", ".", "FashionMNIST/raw", "raw"])
def test_env_var_discovery(no_data, monkeypatch, sub):
    data = no_data / "store"
    folder = _write_fake(data / sub)
    monkeypatch.setenv(images.ENV_VAR, str(data))
    assert images.find_image_dataset("fashion-mnist").samefile(folder)
    splits = images.load_images("fashion-mnist")
    assert splits.train_images.shape == (6, 28, 28) and splits.max_value == 255.0
    assert splits.n_classes == 6 and splits.image_shape == (28, 28)


def test_search_order(no_data, monkeypatch):
    env_dir = _write_fake(no_data / "env" / "fashion-mnist", n_train=4)
    deb_dir = _write_fake(no_data / "debian" / "fashion-mnist", n_train=5)
    torchvision_dir = _write_fake(no_data / "data" / "FashionMNIST" / "raw", n_train=7)
    assert images.find_image_dataset("fashion-mnist").samefile(deb_dir)
    monkeypatch.setenv(images.ENV_VAR, str(no_data / "env"))
    assert images.find_image_dataset("fashion-mnist").samefile(env_dir)
    # an explicit root wins, and is the only place looked at
    assert images.find_image_dataset("fashion-mnist", root=no_data / "data").samefile(
        torchvision_dir
    )
    assert images.find_image_dataset("fashion-mnist", root=no_data / "nowhere") is None
    # MNIST has no Debian package: the Debian folder is not searched for it
    _write_fake(no_data / "debian" / "mnist")
    assert images.find_image_dataset("mnist") is None


def test_not_found_message_lists_places(no_data):
    with pytest.raises(FileNotFoundError) as err:
        images.load_images("fashion-mnist")
    msg = str(err.value)
    assert "peer-ll data fetch fashion-mnist" in msg
    for place in images.image_search_paths("fashion-mnist"):
        assert str(place) in msg
    assert str(no_data / "debian" / "fashion-mnist") in msg
    with pytest.raises(ValueError, match=r"name must be one of \['fashion-mnist', 'mnist'\]"):
        images.image_search_paths("cifar")


def test_digits_split_is_deterministic_and_stratified():
    a, b = images.load_digits_splits(seed=3), images.load_digits_splits(seed=3)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert len(a.train_labels) == 1437 and len(a.test_labels) == 360
    assert a.train_images.shape[1:] == (8, 8) and a.max_value == 16.0
    assert a.test_images.max() <= 16 and a.n_classes == 10
    counts = np.bincount(a.test_labels)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of ~180 per class
    assert not np.array_equal(images.load_digits_splits(seed=4).test_labels, a.test_labels)


class FakeApt:
    """Records commands; "installs" the Debian files after ``fail_first`` failures."""

    def __init__(self, debian_dir: Path, fail_first: int = 0, fail_always: bool = False):
        self.calls, self.debian_dir = [], debian_dir
        self.fail_first, self.fail_always = fail_first, fail_always

    def __call__(self, cmd, check, env):
        assert check is True and env["DEBIAN_FRONTEND"] == "noninteractive"
        self.calls.append(cmd)
        if cmd[1] == "install":
            if self.fail_always or self.fail_first > 0:
                self.fail_first -= 1
                raise subprocess.CalledProcessError(100, cmd)
            _write_fake(self.debian_dir / "fashion-mnist")


def _fetch(**kw):
    kw = {"which": lambda exe: "/usr/bin/" + exe, "is_root": lambda: True, "echo": str} | kw
    return fetch_mod.fetch("fashion-mnist", **kw)


def test_fetch_found_does_not_install(no_data):
    folder = _write_fake(no_data / "debian" / "fashion-mnist")
    apt = FakeApt(no_data / "debian")
    lines = []
    assert _fetch(run=apt, echo=lines.append).samefile(folder)
    assert apt.calls == [] and "found at" in lines[0]


def test_fetch_installs_debian_package(no_data):
    apt = FakeApt(no_data / "debian")
    folder = _fetch(run=apt)
    assert apt.calls == [["apt-get", "install", "-y", "dataset-fashion-mnist"]]
    assert folder.samefile(no_data / "debian" / "fashion-mnist")


def test_fetch_updates_then_retries(no_data):
    apt = FakeApt(no_data / "debian", fail_first=1)
    _fetch(run=apt)
    install = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    assert apt.calls == [install, ["apt-get", "update"], install]


def test_fetch_reports_apt_failure(no_data):
    with pytest.raises(RuntimeError, match="could not install dataset-fashion-mnist"):
        _fetch(run=FakeApt(no_data / "debian", fail_always=True))


@pytest.mark.parametrize(
    "kw", [{"is_root": lambda: False}, {"which": lambda exe: None}, {"root": "elsewhere"}]
)
def test_fetch_without_apt_gives_instructions(no_data, kw):
    apt = FakeApt(no_data / "debian")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        _fetch(run=apt, **kw)
    assert apt.calls == [] and images.ENV_VAR in str(err.value)


def test_fetch_mnist_and_digits(no_data):
    apt = FakeApt(no_data / "debian")
    with pytest.raises(FileNotFoundError, match="MNIST/raw") as err:
        fetch_mod.fetch("mnist", run=apt, is_root=lambda: True, echo=str)
    assert "apt-get" not in str(err.value) and apt.calls == []
    assert fetch_mod.fetch("digits", run=apt, echo=str) is None
    with pytest.raises(ValueError, match="name must be one of"):
        fetch_mod.fetch("cifar10", run=apt)
