"""Text domains: named collections of documents, read from local files only.

Three built-in domains come from files that every CPython install has, so tests
and benchmarks need no download. They share no text with one another:

- ``"python-stdlib"``: the standard library's own ``*.py`` source files, one
  document per file. ``site-packages``, ``dist-packages`` and ``pydoc_data``
  (whose ``topics.py`` holds the next domain's text) are left out; test
  folders are left out unless asked for.
- ``"pydoc-topics"``: English reference prose, ``pydoc_data.topics.topics``,
  one document per topic.
- ``"unicode-names"``: the Unicode character database of ``unicodedata``, as
  tab-separated lines ``U+00E9<TAB>é<TAB>Ll<TAB>LATIN SMALL LETTER E WITH
  ACUTE``, one document per page of 256 code points. Characters whose name
  is derived from the code point (CJK ideographs, Hangul syllables, ...) are
  left out. A structured, multilingual catalog rather than code or prose.

Any folder or list of text files, or a folder written by HF
``datasets.Dataset.save_to_disk``, becomes a domain through `text_domain`.

`load_domain_splits` splits a domain into train and test **by document**:
a seeded permutation of the document ids puts the first
``max(1, round(test_fraction * n))`` of them in test. A document's split
depends only on the seed and the domain, never on the size limits.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

BUILTIN_DOMAINS = ("python-stdlib", "pydoc-topics", "unicode-names")
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "pydoc_data"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


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


def _read_utf8(path: Path) -> str:
    """The text of ``path``, read as UTF-8.

    Undecodable bytes become U+FFFD, with a :class:`NotUTF8Warning` that gives their
    share of the file's characters (a Latin-1 file, say). A file with NUL bytes is
    binary, not text: ValueError.
    """
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"source: expected text files, got the binary file {str(path)!r} "
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


def _stdlib_domain(include_tests: bool) -> TextDomain:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = _SKIPPED_DIRS | (frozenset() if include_tests else _TEST_DIRS)
    ids = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skipped]
        rel = Path(folder).relative_to(root)
        ids.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return TextDomain("python-stdlib", tuple(sorted(ids)), lambda i: _read_utf8(root / i))


def _pydoc_topics_domain() -> TextDomain:
    from pydoc_data.topics import topics

    return TextDomain("pydoc-topics", tuple(sorted(topics)), topics.__getitem__)


def _unicode_line(cp: int) -> str | None:
    ch = chr(cp)
    name = unicodedata.name(ch, None)
    if name is None or name.endswith(f"-{cp:04X}") or name.startswith("HANGUL SYLLABLE "):
        return None  # unnamed, or a name derived from the code point
    shown = ch if ch.isprintable() else ""  # no raw line breaks or format characters
    return f"U+{cp:04X}\t{shown}\t{unicodedata.category(ch)}\t{name}\n"


def _unicode_page(doc_id: str) -> str:
    start = int(doc_id[2:], 16)
    return "".join(filter(None, map(_unicode_line, range(start, start + 256))))


@functools.cache
def _unicode_page_ids() -> tuple[str, ...]:
    ids = [f"U+{p << 8:04X}" for p in range((sys.maxunicode + 1) >> 8)]
    return tuple(i for i in ids if _unicode_page(i))


def _unicode_domain() -> TextDomain:
    return TextDomain("unicode-names", _unicode_page_ids(), _unicode_page)


def builtin_domain(name: str, *, include_tests: bool = False) -> TextDomain:
    """Returns one of the built-in domains that every CPython install has.

    Args:
        name: One of `BUILTIN_DOMAINS`.
        include_tests: For ``"python-stdlib"``, keep the ``test``, ``tests``
            and ``idle_test`` folders (left out by default).

    Returns:
        The domain; its documents are read on demand.

    Raises:
        ValueError: If ``name`` is not a built-in domain.
    """
    if name == "python-stdlib":
        return _stdlib_domain(include_tests)
    if name == "pydoc-topics":
        return _pydoc_topics_domain()
    if name == "unicode-names":
        return _unicode_domain()
    raise ValueError(f"name: expected one of {BUILTIN_DOMAINS}, got {name!r}")


def _saved_dataset_domain(name: str, folder: Path, text_column: str) -> TextDomain:
    loaded = datasets.load_from_disk(str(folder))
    parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    for split, part in parts.items():
        if text_column not in part.column_names:
            raise ValueError(
                f"text_column: expected a column of {folder} (split {split!r}), "
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
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"source: expected an existing path, got {str(root)!r}")
        if root.is_file():
            return TextDomain(name, (root.name,), lambda _: _read_utf8(root))
        if any((root / f).is_file() for f in ("state.json", "dataset_dict.json")):
            return _saved_dataset_domain(name, root, text_column)
        ids = tuple(sorted(p.relative_to(root).as_posix() for p in root.glob(glob) if p.is_file()))
        if not ids:
            raise FileNotFoundError(
                f"source: expected files matching glob={glob!r} in {str(root)!r}, got none"
            )
        return TextDomain(name, ids, lambda i: _read_utf8(root / i))
    paths = [os.fspath(p) for p in source]
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"source: expected existing text files, missing {missing or paths}")
    if len(set(paths)) != len(paths):
        raise ValueError(f"source: expected distinct files, got repeats in {paths}")
    return TextDomain(name, tuple(sorted(paths)), lambda i: _read_utf8(Path(i)))


def _check_limit(value: int | None, argument: str, least: int) -> None:
    if value is not None and (not isinstance(value, int) or value < least):
        raise ValueError(f"{argument}: expected None or an int >= {least}, got {value!r}")


def _take(domain: TextDomain, ids: list[str], max_docs: int | None, max_bytes: int | None):
    """Reads documents in order until ``max_docs`` or ``max_bytes`` is reached.

    The last document is cut to fill ``max_bytes`` exactly (at a UTF-8
    character boundary, so it may fall a few bytes short).
    """
    texts, kept, used = [], [], 0
    for doc_id in ids[:max_docs]:
        if max_bytes is not None and used >= max_bytes:
            break
        raw = domain.read(doc_id).encode("utf-8")
        if max_bytes is not None and used + len(raw) > max_bytes:
            raw = raw[: max_bytes - used]
        used += len(raw)
        texts.append(raw.decode("utf-8", errors="ignore"))
        kept.append(doc_id)
    return texts, kept


def load_domain_splits(
    domain: str | TextDomain,
    *,
    test_fraction: float = 0.1,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Loads a domain's documents, split into train and test by document.

    A seeded permutation of the document ids decides the split. The limits
    are shared between the splits in the ratio ``test_fraction``: test gets
    ``max(1, round(test_fraction * max_docs))`` documents and
    ``max(1, round(test_fraction * max_bytes))`` bytes, train the rest.

    Args:
        domain: A built-in domain name (see `BUILTIN_DOMAINS`) or a
            `TextDomain` made by `text_domain` or `builtin_domain`.
        test_fraction: The share of documents held out for test, in (0, 1).
        max_docs: At most this many documents in all (None: no limit).
        max_bytes: At most this many UTF-8 bytes of text in all (None: no
            limit); the last document of each split is cut to fit.
        seed: Seeds the permutation that splits the documents and orders them.

    Returns:
        A ``DatasetDict`` with splits ``"train"`` and ``"test"``, each with
        string columns ``"text"``, ``"domain"`` and ``"doc_id"``. No
        ``doc_id`` is in both.

    Raises:
        ValueError: If the domain name is unknown, the domain has fewer than
            two documents, or an argument is out of range.
    """
    if isinstance(domain, str):
        domain = builtin_domain(domain)
    if not isinstance(domain, TextDomain):
        raise ValueError(f"domain: expected a name or a TextDomain, got {type(domain).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a float in (0, 1), got {test_fraction!r}")
    _check_limit(max_docs, "max_docs", 2)
    _check_limit(max_bytes, "max_bytes", 2)
    n = len(domain.doc_ids)
    if n < 2:
        raise ValueError(f"domain {domain.name!r}: expected at least 2 documents, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    pools = {"test": order[:n_test], "train": order[n_test:]}
    docs = _share_limit(max_docs, test_fraction)
    size = _share_limit(max_bytes, test_fraction)
    out = {}
    for split, pool in pools.items():
        ids = [domain.doc_ids[i] for i in pool]
        texts, kept = _take(domain, ids, docs[split], size[split])
        out[split] = datasets.Dataset.from_dict(
            {"text": texts, "domain": [domain.name] * len(kept), "doc_id": kept}
        )
    return datasets.DatasetDict(out)


def _share_limit(limit: int | None, test_fraction: float) -> dict[str, int | None]:
    """Shares a limit between the splits: test gets its fraction, train the rest."""
    if limit is None:
        return {"train": None, "test": None}
    test = min(max(1, round(test_fraction * limit)), limit - 1)
    return {"train": limit - test, "test": test}
