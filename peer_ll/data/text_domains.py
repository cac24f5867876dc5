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
``datasets.Dataset.save_to_disk``, becomes a domain through `text_domain`
(:mod:`peer_ll.data.text_files`, re-exported here).

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
from pathlib import Path

import datasets
import numpy as np

from peer_ll.data.text_files import NotUTF8Warning, TextDomain, read_utf8, text_domain
from peer_ll.experts.checks import check_choice

BUILTIN_DOMAINS = ("python-stdlib", "pydoc-topics", "unicode-names")
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "pydoc_data"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def _stdlib_domain(include_tests: bool) -> TextDomain:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = _SKIPPED_DIRS | (frozenset() if include_tests else _TEST_DIRS)
    ids = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skipped]
        rel = Path(folder).relative_to(root)
        ids.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return TextDomain("python-stdlib", tuple(sorted(ids)), lambda i: read_utf8(root / i))


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
    check_choice("name", name, BUILTIN_DOMAINS)
    if name == "python-stdlib":
        return _stdlib_domain(include_tests)
    if name == "pydoc-topics":
        return _pydoc_topics_domain()
    return _unicode_domain()


def _check_limit(value: int | None, argument: str, least: int) -> None:
    if value is not None and (not isinstance(value, int) or value < least):
        raise ValueError(f"{argument} must be None or an int >= {least}, got {value!r}")


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
        raise TypeError(f"domain must be a name or a TextDomain, got {type(domain).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    _check_limit(max_docs, "max_docs", 2)
    _check_limit(max_bytes, "max_bytes", 2)
    n = len(domain.doc_ids)
    if n < 2:
        raise ValueError(f"domain {domain.name!r} must have at least 2 documents, got {n}")
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


__all__ = [
    "BUILTIN_DOMAINS",
    "NotUTF8Warning",
    "TextDomain",
    "builtin_domain",
    "load_domain_splits",
    "text_domain",
]
