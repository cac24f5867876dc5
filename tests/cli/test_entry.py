"""``python -m peer_ll``, ``peer-ll --version``, ``peer_ll.__version__`` and ``py.typed``."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import peer_ll
from peer_ll.cli import main


def test_version_comes_from_the_package_metadata():
    assert peer_ll.__version__ == version("peer-ll")


def test_version_flag_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peer-ll {peer_ll.__version__}"


def test_python_dash_m_runs_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "peer_ll", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: peer-ll" in out and "run" in out and "--version" in out


def test_package_is_marked_typed():
    assert (Path(peer_ll.__file__).parent / "py.typed").is_file()
