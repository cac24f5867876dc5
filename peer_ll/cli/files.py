"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader (or a run killed at any moment) sees the old file or the new one, never half of
one; the temporary file is removed if the write fails. The process umask is never
changed: the new file gets the permissions ``open`` gives any new file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from peer_ll.evaluation.report import json_ready
from peer_ll.models.lm_io import write_atomically

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "json_ready",
    "remove_temporaries",
]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Calls ``write(handle)`` on a temporary file next to ``path``, then moves it there.

    Args:
        path: the file to write (its folder is made if missing).
        write: writes the content into the open binary handle it is given.

    Returns:
        ``path``; see :func:`peer_ll.models.lm_io.write_atomically`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(write, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """Writes ``value`` as indented JSON (NaN and inf as null) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(json_ready(value), indent=1) + "\n")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Removes the ``.tmp-*`` files that killed writes left in ``folder`` (recursively)."""
    removed = [p for p in Path(folder).rglob(".tmp-*") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
