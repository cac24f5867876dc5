"""The checks of ``peer-ll lm``'s arguments, and its run folder's saved progress.

:func:`check_arguments` runs before any data is read or folder made. The run folder
keeps ``records/METHOD.json`` (a method's finished record and its text samples)
beside the checkpoints, written atomically with the torch random state at that
point; ``--resume`` trains the first domain's model anew (deterministic, and its
query statistics are not in a checkpoint), takes up the finished methods and reruns
only the others, so the results equal an uninterrupted run's. A method killed
halfway is rerun from its start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch

from peer_ll.cli.files import atomic_write_text
from peer_ll.cli.run_folder import check_run_folder

#: Arguments that do not change a run's results (left out of ``run.json``).
NOT_SETTINGS = (
    "out",
    "resume",
    "force",
    "no_progress",
    "no_reload_check",
    "threads",
    "run_dir",
    "func",
)
#: API argument names in library messages -> the flags that set them.
FLAGS = {"max_bytes_per_domain": "--max-bytes", "block_size": "--block-size",
         "source": "--domains NAME=PATH"}  # fmt: skip
#: ``--tiny``'s model.
TINY = dict(
    dim=32,
    layers=2,
    attn_heads=2,
    block_size=32,
    peer_num_keys=8,
    peer_heads=2,
    peer_topk=4,
    peer_dim_key=16,
    adapter_rank=4,
    attention_adapter_rank=4,
)
#: ``--tiny``: a smoke run of well under a minute on 2 CPU cores.
TINY_LIMITS = dict(max_bytes=30_000, eval_blocks=4, steps_first=30, steps=10, grow_keys=8,
                   top_t=16)  # fmt: skip


def flag_message(err: BaseException) -> str:
    """``err``'s message with API argument names replaced by the CLI flags."""
    text = str(err)
    for name, flag in FLAGS.items():
        text = text.replace(name, flag)
    return text


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that make a run's results (``run.json``)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def check_arguments(args: argparse.Namespace) -> None:
    """Checks every argument of ``peer-ll lm`` (``--tiny`` limits applied first)."""
    if args.tiny:
        for name, limit in TINY_LIMITS.items():
            setattr(args, name, min(getattr(args, name), limit))
        args.block_size = TINY["block_size"]
    if len(args.domains) < 2:
        raise ValueError(f"--domains must name at least 2 domains, got {args.domains}")
    from peer_ll.data.text_domains import BUILTIN_DOMAINS

    for spec in args.domains:
        name, sep, path = spec.partition("=")
        if not sep and spec not in BUILTIN_DOMAINS:
            raise ValueError(f"--domains: {spec!r} is neither a built-in domain "
                             f"{list(BUILTIN_DOMAINS)} nor NAME=PATH")  # fmt: skip
        if sep and (not name or not Path(path).exists()):
            raise ValueError(f"--domains {spec}: expected NAME=PATH of an existing file or "
                             "folder")  # fmt: skip
    args.run_dir = Path(args.out or f"runs/lm-{dt.datetime.now():%Y%m%d-%H%M%S}")
    check_run_folder(args.run_dir, settings(args), resume=args.resume, force=args.force)


def save_progress(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` (JSON, NaN kept) and the torch random state, atomically."""
    payload = {**record, "rng": torch.get_rng_state().tolist()}
    atomic_write_text(path, json.dumps(payload))


def load_progress(path: Path) -> dict[str, Any] | None:
    """The record saved at ``path`` (its random state restored), or None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    torch.set_rng_state(torch.tensor(record.pop("rng"), dtype=torch.uint8))
    return record
