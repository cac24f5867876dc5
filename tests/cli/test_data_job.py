"""``peer-ll data fetch`` finds local files and explains what to do otherwise."""

from peer_ll.cli import main
from peer_ll.data.idx import write_mnist_like


def test_fetch_reports_files_in_a_given_root(tmp_path, capsys):
    import numpy as np

    images = np.zeros((4, 28, 28), dtype=np.uint8)
    labels = np.arange(4, dtype=np.uint8)
    write_mnist_like(tmp_path, images, labels, images, labels)
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path)]) == 0
    assert str(tmp_path) in capsys.readouterr().out


def test_fetch_mnist_without_files_explains(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEER_LL_DATA", str(tmp_path))
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path / "empty")]) == 1
    assert "PEER_LL_DATA" in capsys.readouterr().err


def test_unknown_data_set_is_rejected():
    assert main(["data", "fetch", "cifar"]) == 2
