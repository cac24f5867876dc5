"""Checks of command-line arguments, run before a command touches anything.

The ``type=`` converters raise ``argparse.ArgumentTypeError``, so argparse reports
``peer-ll CMD: error: argument --flag: ...`` and exits with status 2. The checks of a
whole command (:func:`check_out_dir`, :func:`check_device`, ...) raise ``ValueError``
with a message that names the flag; :func:`peer_ll.cli.main` turns it into the same
``peer-ll CMD: error: ...`` line and status 2, before any folder is made.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    """An ``int >= 1``."""
    return _int(text, minimum=1)


def non_negative_int(text: str) -> int:
    """An ``int >= 0``."""
    return _int(text, minimum=0)


def _int(text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, got {text!r}"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite ``float > 0``."""
    return _float(text, positive=True)


def non_negative_float(text: str) -> float:
    """A finite ``float >= 0``."""
    return _float(text, positive=False)


def _float(text: str, *, positive: bool) -> float:
    want = "a finite number > 0" if positive else "a finite number >= 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value


def seed_list(text: str) -> list[int]:
    """``"3"`` -> ``[0, 1, 2]``; ``"4,7"`` -> ``[4, 7]``; ``"5,"`` -> ``[5]``; distinct, >= 0."""
    want = "a count N >= 1 or a comma-separated list of distinct seeds >= 0 like 0,1 (one: 5,)"
    listed = text.strip().endswith(",")  # "5,": a list of the one seed 5, not a count
    parts = [p.strip() for p in text.strip().removesuffix(",").split(",")]
    try:
        if len(parts) == 1 and not listed:
            count = int(parts[0])
            if count < 1:
                raise ValueError
            return list(range(count))
        if listed and len(parts) > 1:  # a trailing comma only marks one seed
            raise ValueError
        seeds = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return seeds


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if torch can use it here; ValueError naming ``flag`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{flag} must be a torch device like cpu or cuda:0, got {device!r}"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"{flag} must be cpu or cuda[:N], got {device!r}")
    return device


def writable(path: Path) -> bool:
    """Whether this process may create files in the folder ``path`` (mode bits honoured
    even for root, who ``os.access`` lets write anywhere)."""
    mode = path.stat().st_mode
    return os.access(path, os.W_OK | os.X_OK) and bool(mode & stat.S_IWUSR)


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder that can be made or written; ValueError naming ``flag``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} must be a folder, got the file {path}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} must be a folder, but {existing} is a file")
    if not writable(existing):
        raise ValueError(f"{flag} {path}: the folder {existing} is read-only")
    return path
