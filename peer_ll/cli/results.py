"""The one writer of ``benchmarks/RESULTS.md``, and the record of a run's machine.

``RESULTS.md`` is a list of ``## `` sections, one per benchmark script. A script calls
:func:`write_section` with its heading and the new text:

- ``replace=False`` (default): the text goes at the end of the heading's section, after
  the runs recorded before (the section is created at the end of the file if missing);
- ``replace=True``: the text replaces the section's body; with ``keep_from``, the old
  body's text from that marker on (hand-written notes) is kept below it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer_ll.experts.checks import check_choice

#: The first line of a RESULTS.md file that does not exist yet.
TITLE = "# Benchmark results\n"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Date, machine and library versions, for the record."""
    import avalanche

    import peer_ll

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(date=dt.datetime.now().isoformat(timespec="seconds"), cpus=os.cpu_count(),
                gpu=gpu, device=device, torch_threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__,
                avalanche=getattr(avalanche, "__version__", "?"), numpy=np.__version__,
                peer_ll=peer_ll.__version__)  # fmt: skip


def environment_line(env: dict[str, Any] | None = None, *, date: str | None = None) -> str:
    """One Markdown line: date, machine and versions of :func:`environment`'s record.

    Args:
        env: a record of :func:`environment` (default: this process's).
        date: replaces the record's date, e.g. the dates of runs that a report gathers.
    """
    env = env or environment()
    return (f"Date: {date or env['date']}; machine: {env['cpus']} CPUs, "
            f"GPU: {env['gpu'] or 'none'}, device {env['device']}, "
            f"{env['torch_threads']} torch thread(s); python "
            f"{env['python']}, torch {env['torch']}, avalanche {env['avalanche']}, "
            f"numpy {env['numpy']}.")  # fmt: skip


def write_section(
    path: str | Path,
    heading: str,
    text: str,
    *,
    replace: bool = False,
    keep_from: str | None = None,
) -> Path:
    """Writes ``text`` into the ``heading`` section of the Markdown file ``path``.

    Args:
        path: the RESULTS.md file (created with :data:`TITLE` if missing).
        heading: the section's heading line, starting with ``"## "``.
        text: the new Markdown, without the heading.
        replace: replace the section's body instead of appending to it.
        keep_from: with ``replace``, keep the old body from this marker on.

    Returns:
        ``path``.
    """
    if not isinstance(heading, str) or not heading.startswith("## ") or "\n" in heading:
        raise ValueError(f"heading must be one line starting with '## ', got {heading!r}")
    check_choice("replace", replace, (False, True))
    if keep_from is not None and not replace:
        raise ValueError(f"keep_from must be None unless replace=True, got {keep_from!r}")
    path = Path(path)
    doc = path.read_text() if path.exists() else TITLE
    text = text.strip("\n")
    if heading not in doc.splitlines():
        doc = doc.rstrip("\n") + f"\n\n{heading}\n\n{text}\n"
    else:
        start = doc.index(f"{heading}\n") if f"{heading}\n" in doc else doc.index(heading)
        body_start = start + len(heading) + 1
        nxt = doc.find("\n## ", body_start - 1)
        end = len(doc) if nxt < 0 else nxt + 1
        old = doc[body_start:end]
        if replace:
            new = f"\n{text}\n"
            marker = -1 if keep_from is None else old.find(keep_from)
            if marker >= 0:
                new += "\n" + old[marker:].rstrip("\n") + "\n"
        else:
            new = old.rstrip("\n") + f"\n\n{text}\n"
        doc = doc[:body_start] + new + ("\n" if nxt >= 0 else "") + doc[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    return path
