"""Atomic writes of the CLI: one implementation (models.lm_io.write_atomically)."""

import os

import pytest

from peer_ll.cli.files import atomic_write, atomic_write_json


def test_atomic_write_makes_the_folder_and_gives_the_usual_mode(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.bin", lambda handle: handle.write(b"abc"))
    assert path.read_bytes() == b"abc"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    atomic_write_json(tmp_path / "c.json", {"x": float("nan")})
    assert (tmp_path / "c.json").read_text().strip() == '{\n "x": null\n}'


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "b.bin", lambda handle: handle.write(b"old"))

    def broken(handle):
        handle.write(b"new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]
