"""The run folder of ``peer-ll run`` and ``peer-ll lm``: refused, replaced or resumed.

A run folder holds ``run.json`` (the settings it was started with) from its first
moment. An existing, non-empty folder is refused unless the command is given
``--resume`` (same settings: continue) or ``--force`` (remove the old run's files
first, so no stale table, plot or log stays beside the new ones). ``--force`` removes
only a folder that ``run.json`` or ``results.json`` marks as a run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peer_ll.cli.args import check_out_dir
from peer_ll.cli.files import atomic_write_json, json_ready, remove_temporaries

MARKER = "run.json"


def check_run_folder(path: str | Path, settings: dict[str, Any], *, resume: bool,
                     force: bool) -> Path:  # fmt: skip
    """Checks that ``path`` may hold this run; changes nothing.

    Raises:
        ValueError: naming ``--out``, ``--resume`` or ``--force``.
    """
    path = check_out_dir(path)
    if resume and force:
        raise ValueError("--resume and --force exclude each other")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    marked = (path / MARKER).is_file() or (path / "results.json").is_file()
    if resume:
        if not (path / MARKER).is_file():
            raise ValueError(f"--resume: {path} holds no {MARKER}; it is not a run to resume")
        try:
            old = json.loads((path / MARKER).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume: {path / MARKER} cannot be read: {err}") from err
        new = json_ready(settings)
        if not isinstance(old, dict) or old != new:
            keys = sorted(
                k
                for k in set(new) | set(old if isinstance(old, dict) else {})
                if not isinstance(old, dict) or old.get(k) != new.get(k)
            )
            raise ValueError(
                f"--resume: {path} was started with other settings ({keys}); "
                "resume with the same arguments or pass --force"
            )
        return path
    if force:
        if not marked:
            raise ValueError(
                f"--force: {path} is not a run folder (no {MARKER} or "
                "results.json); refusing to remove its files"
            )
        return path
    raise ValueError(
        f"--out {path} holds files already: pass --resume to continue the run "
        "there or --force to replace it"
    )


def open_run_folder(path: str | Path, settings: dict[str, Any], *, resume: bool,
                    force: bool) -> Path:  # fmt: skip
    """Makes the run folder (after :func:`check_run_folder` passed).

    With ``force`` the old run's files are removed; with ``resume`` they stay, except
    temporary files of killed writes. ``run.json`` holds ``settings``.
    """
    path = Path(path)
    if force and path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if path.is_dir():
        remove_temporaries(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / MARKER, settings)
    return path
