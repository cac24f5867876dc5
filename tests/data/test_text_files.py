"""Text domains from a user's files: Latin-1 text warns with its share of replaced
characters, binary files are refused."""

import warnings

import pytest

from peer_ll.data.text_domains import NotUTF8Warning, load_domain_splits, text_domain


def test_latin1_text_warns_with_the_share_of_replaced_characters(tmp_path):
    (tmp_path / "a.txt").write_bytes("café crème\n".encode("latin-1"))  # 2 of 11 chars
    domain = text_domain("fr", tmp_path)
    with pytest.warns(NotUTF8Warning, match=r"2 of 11 characters \(18.2 %\) were replaced"):
        text = domain.read("a.txt")
    assert text == "caf\ufffd cr\ufffdme\n"


def test_utf8_text_with_a_genuine_replacement_character_does_not_warn(tmp_path):
    (tmp_path / "a.txt").write_text("ok \ufffd café\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert text_domain("d", tmp_path).read("a.txt") == "ok \ufffd café\n"


def test_binary_files_are_refused(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_bytes(bytes(range(256)) * 8)
    domain = text_domain("bin", tmp_path)
    binary = r"source must be text files, got the binary file .*[0-3].txt.* \(NUL byte at offset 0"
    with pytest.raises(ValueError, match=binary):
        load_domain_splits(domain, seed=0)
