"""Text domains from local files: a folder or list of text files, or a saved HF dataset.

A :class:`TextDomain` is a named collection of documents, read lazily. Any folder or list
of text files, or a folder written by HF ``datasets.Dataset.save_to_disk``, becomes one
through :func:`text_domain`. Files are read as UTF-8 (:class:`NotUTF8Warning` for other
bytes). The built-in domains and the train/test split are in
:mod:`peer_ll.data.text_domains`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets


@dataclass(frozen=True)
class TextDomain:
    """A named collection of documents, read lazily one at a time.

    Attributes:
        name: The domain's name; it names its Avalanche experience.
        doc_ids: Every document's id, in a deterministic (sorted) order.
        read: Returns the text of the document with a given id.
    """

    name: str
    doc_ids: tuple[str, ...]
    read: Callable[[str], str]


class NotUTF8Warning(UserWarning):
    """A text file held bytes that are not UTF-8; they were read as U+FFFD."""


def read_utf8(path: Path) -> str:
    """The text of ``path``, read as UTF-8.

    Undecodable bytes become U+FFFD, with a :class:`NotUTF8Warning` that gives their
    share of the file's characters (a Latin-1 file, say). A file with NUL bytes is
    binary, not text: ValueError.
    """
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"source must be text files, got the binary file {str(path)!r} "
                         f"(NUL byte at offset {nul})")  # fmt: skip
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced:
        warnings.warn(
            f"{str(path)!r} is not UTF-8: {replaced} of {len(text)} characters "
            f"({100 * replaced / len(text):.1f} %) were replaced by U+FFFD; convert it "
            "(e.g. iconv -f latin1 -t utf-8) to train on its text",
            NotUTF8Warning, stacklevel=2,
        )  # fmt: skip
    return text


def _saved_dataset_domain(name: str, folder: Path, text_column: str) -> TextDomain:
    loaded = datasets.load_from_disk(str(folder))
    parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    for split, part in parts.items():
        if text_column not in part.column_names:
            raise ValueError(
                f"text_column must be a column of {folder} (split {split!r}), "
                f"got {text_column!r}; columns are {part.column_names}"
            )
    ids = tuple(f"{s}:{i}" if s else str(i) for s, p in parts.items() for i in range(len(p)))

    def read(doc_id: str) -> str:
        split, _, index = doc_id.rpartition(":")
        return parts[split][int(index)][text_column]

    return TextDomain(name, ids, read)


def text_domain(
    name: str,
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    glob: str = "**/*.txt",
    text_column: str = "text",
) -> TextDomain:
    """Makes a domain from local text files or a saved HF ``datasets`` folder.

    Each file (or each row of a saved dataset) is one document. Files are
    read as UTF-8 when their documents are read; undecodable bytes become U+FFFD
    with a ``NotUTF8Warning`` giving their share, and a binary file (NUL bytes)
    raises ValueError.

    Args:
        name: The domain's name.
        source: A folder of text files (matched by ``glob``), a folder that
            ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
            wrote, one text file, or a sequence of text files.
        glob: The pattern of the files to take from a folder, relative to it.
        text_column: The column that holds the text, in a saved dataset.

    Returns:
        The domain. Document ids are paths relative to the folder (or the
        paths as given), or row numbers ``"split:row"`` in a saved dataset.

    Raises:
        ValueError: If ``name`` is empty, or the files listed repeat.
        FileNotFoundError: If a path does not exist, or a folder holds no file
            that matches ``glob``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"source must be an existing path, got {str(root)!r}")
        if root.is_file():
            return TextDomain(name, (root.name,), lambda _: read_utf8(root))
        if any((root / f).is_file() for f in ("state.json", "dataset_dict.json")):
            return _saved_dataset_domain(name, root, text_column)
        ids = tuple(sorted(p.relative_to(root).as_posix() for p in root.glob(glob) if p.is_file()))
        if not ids:
            raise FileNotFoundError(
                f"source must hold files matching glob={glob!r} in {str(root)!r}, got none"
            )
        return TextDomain(name, ids, lambda i: read_utf8(root / i))
    paths = [os.fspath(p) for p in source]
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"source must be existing text files, missing {missing or paths}")
    if len(set(paths)) != len(paths):
        raise ValueError(f"source must be distinct files, got repeats in {paths}")
    return TextDomain(name, tuple(sorted(paths)), lambda i: read_utf8(Path(i)))
